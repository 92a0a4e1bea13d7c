"""A socketmap client as Postfix's: netstring requests "NAME KEY" on a persistent
connection, each reply read exactly (its length, its comma, nothing after it)."""

import socket


def request(key: bytes, name: bytes = b"postfix") -> bytes:
    """The netstring of one request."""
    payload = name + b" " + key
    return b"%d:%s," % (len(payload), payload)


def read_replies(sock, count):
    """Exactly `count` reply payloads, and nothing after them. ConnectionError (an
    OSError: a killed server's clients catch it) if the server closes first."""
    replies, data = [], b""
    while len(replies) < count:
        colon = data.find(b":")
        if colon > 0 and len(data) > colon + int(data[:colon]):
            length = int(data[:colon])
            assert data[colon + 1 + length : colon + 2 + length] == b","
            replies.append(data[colon + 1 : colon + 1 + length])
            data = data[colon + 2 + length :]
            continue
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"socketmap closed the connection; read {replies!r}, then {data[:80]!r}")
        data += chunk
    assert data == b""
    return replies


class Socketmap:
    def __init__(self, port, name="postfix", timeout=15):
        self.name = name.encode()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def ask_bytes(self, key: bytes) -> bytes:
        """The reply payload to one request, as bytes (a key need not be UTF-8)."""
        self.sock.sendall(request(key, self.name))
        return read_replies(self.sock, 1)[0]

    def ask(self, domain: str) -> str:
        return self.ask_bytes(domain.encode()).decode()

    def close(self):
        self.sock.close()


def ask(port, domain, name="postfix"):
    """One lookup on a connection of its own."""
    client = Socketmap(port, name)
    try:
        return client.ask(domain)
    finally:
        client.close()
