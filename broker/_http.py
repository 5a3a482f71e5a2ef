"""HTTP/1.1 parsing and responses, sans-IO.

Theory of operation
-------------------
Parsing is sans-IO: ``RequestReader`` takes bytes from the socket and hands
back whole ``Request`` objects, using httptools (llhttp, the parser Node uses)
for the grammar.  The Trio side only moves bytes: one task per connection reads
64 KiB at a time, feeds the reader, and answers each request in order
(keep-alive and pipelining work as HTTP/1.1 says).

A request that asks to switch protocols comes back with ``upgrade`` set, and
the bytes after it in ``RequestReader.leftover``: the WebSocket side
(_ws.py) takes the connection from there.

The reader also says where it is in the current message (``phase``: between
messages, inside a request head, or inside a body), so the connection task can
apply the right deadline to its next read (_server.py) without parsing
anything itself.  A body bigger than ``max_body_bytes`` is refused (413) as
soon as its Content-Length says so, or as soon as a chunked body passes it.
"""

from __future__ import annotations

import enum
import json
import logging
from dataclasses import dataclass, field

import httptools
import trio


log = logging.getLogger("broker.http")

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024       # the default; HttpLimits.max_body_bytes sets it


class Phase(enum.Enum):
    """Where the reader is: what the bytes it waits for belong to."""
    IDLE = "idle"        # between requests: nothing of the next one has arrived
    HEAD = "head"        # the request line and headers are arriving
    BODY = "body"        # the headers are complete; the body is arriving


@dataclass(slots=True)
class Request:
    method: str
    target: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    keep_alive: bool = True
    upgrade: bool = False        # asks to switch protocols (WebSocket); the last request read

    def header(self, name: bytes) -> str | None:
        """The first value of header ``name`` (lower case), or None."""
        for k, v in self.headers:
            if k == name:
                return v.decode("latin-1")
        return None


class BadRequest(Exception):
    """The peer sent something unparseable or over a limit."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class RequestReader:
    """Bytes in, whole requests out. No I/O."""

    def __init__(self, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.max_body_bytes = max_body_bytes
        self.phase = Phase.IDLE
        self._parser = httptools.HttpRequestParser(self)
        self._current: Request | None = None
        self._url = bytearray()
        self._header_bytes = 0
        self._ready: list[Request] = []
        self.leftover = b""      # after an upgrade request: the bytes that followed it
        # Garbage after whole requests in the same feed: those requests are
        # answered first, then this, and the connection closes.
        self.error: BadRequest | None = None

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._current = Request("", "")
        self.phase = Phase.HEAD
        self._url.clear()
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._current is not None
        self._count(len(name) + len(value))
        if self.phase is Phase.BODY:
            # A chunked body's trailer.  Nothing here reads trailers, and
            # merged into the headers one could smuggle in what the head
            # did not say (an Authorization, a Content-Type).
            return
        self._current.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        assert self._current is not None
        if len(self._current.body) + len(body) > self.max_body_bytes:
            raise self._too_large()
        self._current.body += body

    def on_headers_complete(self) -> None:
        assert self._current is not None
        self.phase = Phase.BODY
        for name, value in self._current.headers:
            if name == b"content-length" and value.strip().isdigit() \
                    and int(value) > self.max_body_bytes:
                raise self._too_large()

    def _too_large(self) -> BadRequest:
        return BadRequest(f"body larger than {self.max_body_bytes} bytes", 413, "body_too_large")

    def on_message_complete(self) -> None:
        req = self._current
        assert req is not None
        req.method = self._parser.get_method().decode()
        req.target = self._url.decode("latin-1")
        req.keep_alive = self._parser.should_keep_alive()
        self._ready.append(req)
        self._current = None
        self.phase = Phase.IDLE

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_BYTES:
            raise BadRequest("headers too large")

    def feed(self, data: bytes | bytearray) -> list[Request]:
        """Parse ``data``; return the requests it completed.  Raises BadRequest
        if the bytes are bad before any request completed; if some did, they are
        returned and the error is kept in ``error``, to be answered after them."""
        if self.error is not None:
            raise self.error
        try:
            self._feed(data)
        except BadRequest as exc:
            if not self._ready:
                raise
            self.error = exc
        ready, self._ready = self._ready, []
        return ready

    def _feed(self, data: bytes | bytearray) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # The parser stops after the request: what follows is the new
            # protocol's, and this reader is done.
            if not self._ready:
                raise BadRequest("incomplete upgrade request") from None
            self._ready[-1].upgrade = True
            self.leftover = bytes(data[exc.args[0]:]) if exc.args else b""
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, BadRequest):
                raise cause from None
            raise BadRequest(str(exc)) from None
        except httptools.HttpParserError as exc:
            raise BadRequest(str(exc)) from None


_REASONS = {200: "OK", 201: "Created", 204: "No Content", 304: "Not Modified",
            400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 410: "Gone",
            413: "Content Too Large", 429: "Too Many Requests", 500: "Internal Server Error",
            501: "Not Implemented", 503: "Service Unavailable"}

# Sent on every response: CORS for browsers, and the security headers the
# Durable Streams spec lists.
_COMMON = (
    b"access-control-allow-origin: *\r\n"
    b"access-control-allow-methods: GET, POST, PUT, DELETE, HEAD, OPTIONS\r\n"
    b"access-control-allow-headers: content-type, authorization, Stream-Seq, Stream-TTL, "
    b"Stream-Expires-At, Stream-Closed, Producer-Id, Producer-Epoch, Producer-Seq, "
    b"Stream-Forked-From, Stream-Fork-Offset, Stream-Fork-Sub-Offset, If-None-Match, "
    b"Broker-Kind, Broker-Meta, Broker-Client, Broker-Presence\r\n"
    b"access-control-expose-headers: Stream-Next-Offset, Stream-Cursor, Stream-Up-To-Date, "
    b"Stream-Closed, Stream-Earliest-Offset, Producer-Epoch, Producer-Seq, "
    b"Producer-Expected-Seq, Producer-Received-Seq, etag, content-type, content-encoding, "
    b"vary, retry-after, www-authenticate, Broker-Epoch, Broker-First-Offset\r\n"
    b"x-content-type-options: nosniff\r\n"
    b"cross-origin-resource-policy: cross-origin\r\n"
)

Headers = list[tuple[str, str]]


def head_bytes(status: int, headers: Headers, length: int | None,
               keep_alive: bool = True) -> bytes:
    """Status line and headers; ``length`` None means chunked."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n".encode()]
    lines.extend(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers)
    lines.append(_COMMON)
    if length is None:
        lines.append(b"transfer-encoding: chunked\r\n")
    elif status not in (204, 304):
        lines.append(b"content-length: %d\r\n" % length)
    if not keep_alive:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def response(status: int, body: bytes, content_type: str = "application/json",
             keep_alive: bool = True, headers: Headers | None = None) -> bytes:
    headers = headers or []
    has_ct = any(k.lower() == "content-type" for k, _ in headers)
    hs = [("content-type", content_type)] if (body or status >= 400) and not has_ct else []
    return head_bytes(status, hs + headers, len(body), keep_alive) + body


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def error(status: int, code: str, message: str, headers: Headers | None = None) -> bytes:
    return response(status, error_body(code, message), headers=headers)


class Responder:
    """How a handler answers: one whole response, or a chunked stream."""

    def __init__(self, stream: trio.abc.Stream, method: str) -> None:
        self._stream = stream
        self.head_only = method == "HEAD"
        self.sent = False

    async def send(self, data: bytes) -> None:
        """A whole response built with ``response``/``error``."""
        if self.head_only:
            data = data[: data.index(b"\r\n\r\n") + 4]
        self.sent = True
        await self._stream.send_all(data)

    async def start(self, status: int, headers: Headers) -> None:
        self.sent = True
        await self._stream.send_all(head_bytes(status, headers, None))

    async def chunk(self, data: bytes) -> None:
        if data:
            await self._stream.send_all(b"%x\r\n%b\r\n" % (len(data), data))

    async def end(self) -> None:
        await self._stream.send_all(b"0\r\n\r\n")


def error_response(exc: BadRequest) -> bytes:
    return closing_error(exc.status, exc.code, str(exc))


def closing_error(status: int, code: str, message: str,
                  headers: Headers | None = None) -> bytes:
    """An error after which the server closes the connection (``connection: close``)."""
    return response(status, error_body(code, message), keep_alive=False, headers=headers)

