"""A minimal MTA side of the milter protocol, for protocol-level tests: option
negotiation, and the malformed openings a hostile or broken client can send."""

import socket
import struct
import time

MTA_ACTIONS = 0x1FF  # ADDHDRS .. SETSYMLIST, as Postfix 3.x offers them
MTA_PROTOCOL = 0x1FFFFF  # every protocol step bit (milter protocol 6)


def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + command + data


OPTNEG = packet(b"O", struct.pack("!III", 6, MTA_ACTIONS, MTA_PROTOCOL))

# What ten broken or hostile MTA-side clients send, each on its own connection. Some
# make libmilter close at once; the truncated ones keep a libmilter worker reading
# (for [milter] timeout) a packet that never completes.
MALFORMED_OPENINGS = (
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # garbage
    OPTNEG[:7],  # a truncated packet
    b"\x80\x00\x00\x00O",  # a 2 GB length prefix
    b"\xff\xff\xff\xffO",  # a 4 GB length prefix
    b"\x00\x00\x00\x00",  # a zero length (and no command byte)
    packet(b"R", b"<rcpt@example.com>\0"),  # RCPT before anything
    packet(b"Z", b"junk"),  # an unknown command
    OPTNEG + b"\x01\x02garbage",  # negotiation, then garbage
    OPTNEG + packet(b"D", b"C" + b"x" * (1 << 20)),  # negotiation, then a 1 MB macro packet
    OPTNEG[:3],  # three bytes of a length
)


def address(spec: str):
    """(family, address) of a milter socket spec: inet:PORT@HOST or unix:/PATH."""
    if spec.startswith(("unix:", "local:")):
        return socket.AF_UNIX, spec.split(":", 1)[1]
    port, _, host = spec.split(":", 1)[1].partition("@")
    return socket.AF_INET, (host or "127.0.0.1", int(port))


def connect(spec: str, timeout: float = 5.0) -> socket.socket:
    family, where = address(spec)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(where)
    return sock


def read_packet(sock: socket.socket):
    """(command byte, data) of the next packet; EOFError if the milter closed."""
    head = _read_exactly(sock, 5)
    size = struct.unpack("!I", head[:4])[0]
    return head[4:5], _read_exactly(sock, size - 1)


def _read_exactly(sock, count):
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError(f"milter closed after {len(data)} of {count} bytes")
        data += chunk
    return data


def negotiation_seconds(spec: str, timeout: float) -> float:
    """Connect, send an option negotiation as Postfix does, and return how long the
    reply took. socket.timeout if none came within timeout seconds."""
    with connect(spec, timeout) as sock:
        started = time.monotonic()
        sock.sendall(OPTNEG)
        command, data = read_packet(sock)
        assert command == b"O" and len(data) >= 12, (command, data[:12])
        return time.monotonic() - started


def open_malformed(spec: str):
    """One connection per MALFORMED_OPENINGS entry, each sent its bytes and left open."""
    sockets = []
    for opening in MALFORMED_OPENINGS:
        sock = connect(spec)
        sockets.append(sock)
        try:
            sock.sendall(opening)
        except OSError:
            pass  # the milter may close before a megabyte is written
    return sockets
