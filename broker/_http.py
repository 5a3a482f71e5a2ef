"""The HTTP/1.1 listener (the seed of issue 3's Durable Streams server).

Theory of operation
-------------------
Parsing is sans-IO: ``RequestReader`` takes bytes from the socket and hands
back whole ``Request`` objects, using httptools (llhttp, the parser Node uses)
for the grammar.  The Trio side only moves bytes: one task per connection reads
64 KiB at a time, feeds the reader, and answers each request in order
(keep-alive and pipelining work as HTTP/1.1 says).

For now the routes are ``GET /healthz`` (200 once the broker is open) and a
JSON 404 for everything else; the Durable Streams API at ``/v1/stream/<path>``
and the WebSocket upgrade at ``/v1/ws`` plug in here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import httptools
import trio

from ._broker import Broker

log = logging.getLogger("broker.http")

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass(slots=True)
class Request:
    method: str
    target: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    keep_alive: bool = True


class BadRequest(Exception):
    pass


class RequestReader:
    """Bytes in, whole requests out. No I/O."""

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._current: Request | None = None
        self._url = bytearray()
        self._header_bytes = 0
        self._ready: list[Request] = []

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._current = Request("", "")
        self._url.clear()
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._current is not None
        self._current.headers.append((name.lower(), value))
        self._count(len(name) + len(value))

    def on_body(self, body: bytes) -> None:
        assert self._current is not None
        if len(self._current.body) + len(body) > MAX_BODY_BYTES:
            raise BadRequest("body too large")
        self._current.body += body

    def on_message_complete(self) -> None:
        req = self._current
        assert req is not None
        req.method = self._parser.get_method().decode()
        req.target = self._url.decode("latin-1")
        req.keep_alive = self._parser.should_keep_alive()
        self._ready.append(req)
        self._current = None

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_BYTES:
            raise BadRequest("headers too large")

    def feed(self, data: bytes) -> list[Request]:
        """Parse ``data``; return the requests it completed. Raises BadRequest."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise BadRequest("upgrade not supported yet") from None
        except httptools.HttpParserError as exc:
            raise BadRequest(str(exc)) from None
        ready, self._ready = self._ready, []
        return ready


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


def response(status: int, body: bytes, content_type: str = "application/json",
             keep_alive: bool = True) -> bytes:
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"content-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
            f"{'' if keep_alive else 'connection: close' + chr(13) + chr(10)}\r\n")
    return head.encode() + body


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


class HttpServer:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def handle(self, req: Request) -> bytes:
        path = req.target.split("?", 1)[0]
        if path == "/healthz":
            if req.method not in ("GET", "HEAD"):
                return response(405, error_body("method_not_allowed", "use GET"))
            return response(200, b'{"status":"ok"}', keep_alive=req.keep_alive)
        return response(404, error_body("not_found", f"no route for {path}"),
                        keep_alive=req.keep_alive)

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        reader = RequestReader()
        try:
            async with stream:
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    try:
                        requests = reader.feed(data)
                    except BadRequest as exc:
                        await stream.send_all(response(400, error_body("bad_request", str(exc)),
                                                       keep_alive=False))
                        return
                    if requests:
                        await stream.send_all(b"".join(self.handle(r) for r in requests))
                        if not requests[-1].keep_alive:
                            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
