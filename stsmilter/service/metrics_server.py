"""The /metrics HTTP endpoint, with bounded connections and a deadline per request.

prometheus_client.start_http_server starts one thread per connection and waits for a
request as long as the client likes: 300 idle connections made 300 threads. This
server is one asyncio loop in one thread. It keeps at most MAX_CONNECTIONS open (a new
one closes the longest-open one), gives each REQUEST_TIMEOUT seconds to send its
request head (at most MAX_HEAD bytes) and to take the reply, and answers every GET
with prometheus_client's own exposition (choose_encoder: text or OpenMetrics, gzip
when asked), then closes. Prometheus reconnects for every scrape, which is cheap.
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import logging

from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder, gzip_accepted

from stsmilter.threads import LoopServer

log = logging.getLogger("stsmilter.metrics_server")

MAX_CONNECTIONS = 32
REQUEST_TIMEOUT = 10.0  # seconds for the request head to arrive and the reply to leave
MAX_HEAD = 8192


def _reply(status: str, headers, body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status}"] + [f"{name}: {value}" for name, value in headers]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def render(head: bytes, registry=REGISTRY) -> bytes:
    """The whole HTTP response to a request head (request line and header lines)."""
    lines = head.decode("latin-1").split("\r\n")
    method = lines[0].split(" ", 1)[0]
    if method not in ("GET", "HEAD"):
        return _reply("405 Method Not Allowed", [("Allow", "GET, HEAD")], b"")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    encoder, content_type = choose_encoder(fields.get("accept", ""))
    body = encoder(registry)
    headers = [("Content-Type", content_type)]
    if gzip_accepted(fields.get("accept-encoding", "")):
        body = gzip.compress(body)
        headers.append(("Content-Encoding", "gzip"))
    response = _reply("200 OK", headers, body)
    return response[: len(response) - len(body)] if method == "HEAD" else response


class MetricsServer(LoopServer):
    """start() binds and serves from a thread of its own; stop() ends both."""

    thread_name, log, what = "stsmilter-metrics", log, "metrics"

    def __init__(self, host: str, port: int, max_connections: int = MAX_CONNECTIONS,
                 request_timeout: float = REQUEST_TIMEOUT, registry=REGISTRY):
        super().__init__()
        self.host, self.port = host, port
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.registry = registry
        self.evicted = 0
        self._open = collections.OrderedDict()  # writer -> None, oldest first

    @property
    def address(self):
        return self._listener.sockets[0].getsockname()[:2]

    async def _bind(self):
        # OSError: address in use, no such address
        return await asyncio.start_server(self._serve, self.host, self.port, backlog=128, limit=MAX_HEAD)

    async def _shutdown(self) -> None:
        self._listener.close()
        for writer in list(self._open):
            writer.transport.abort()
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= self.max_connections:
            oldest = next(iter(self._open))
            self._open.pop(oldest)
            oldest.transport.abort()  # its _serve ends with a connection error
            self.evicted += 1
            if self.evicted & (self.evicted - 1) == 0:  # 1, 2, 4, 8...
                log.warning("metrics: more than %d connections open; %d closed early",
                            self.max_connections, self.evicted)
        self._open[writer] = None
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.request_timeout)
            writer.write(render(head[:-4], self.registry))
            await asyncio.wait_for(writer.drain(), self.request_timeout)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                asyncio.CancelledError):
            pass  # slow, silent, oversized or gone (or we are stopping): just close
        except Exception:
            log.exception("metrics: cannot answer a request")
        finally:
            self._open.pop(writer, None)
            writer.close()
