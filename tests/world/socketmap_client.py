"""A socketmap client as Postfix's: netstring requests on one persistent connection."""

import socket


class Socketmap:
    def __init__(self, port, name="postfix"):
        self.name = name
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.buffer = b""

    def ask(self, domain):
        request = f"{self.name} {domain}".encode()
        self.sock.sendall(b"%d:%s," % (len(request), request))
        while b":" not in self.buffer:
            self.buffer += self._recv()
        length, rest = self.buffer.split(b":", 1)
        while len(rest) < int(length) + 1:
            rest += self._recv()
        self.buffer = rest[int(length) + 1 :]
        return rest[: int(length)].decode()

    def _recv(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("socketmap closed the connection")
        return data

    def close(self):
        self.sock.close()


def ask(port, domain):
    """One lookup on a connection of its own."""
    client = Socketmap(port)
    try:
        return client.ask(domain)
    finally:
        client.close()
