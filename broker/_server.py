"""The HTTP/1.1 listener: one task per connection, requests answered in order.

Theory of operation
-------------------
Each connection task reads 64 KiB at a time and feeds the sans-IO
``RequestReader`` (_http.py), which hands back whole requests.  Requests on a
connection are answered one after another (HTTP/1.1 keep-alive and
pipelining); a handler answers through a ``Responder``, either with one
response or as a chunked stream (SSE).  Garbage on a connection gets a 400 and
that connection is closed; no other connection notices.

Routes: ``/healthz``; the Durable Streams API under ``/v1/stream/`` (_streams.py);
the WebSocket upgrade at ``/v1/ws``, after which the connection belongs to
_ws.py; the browser client at ``/client/broker.js`` and, with ``demo``, the
demo page at ``/demo`` (package data in ``broker/static/``, read per request:
they are small, and rarely asked for).

Limits (``HttpLimits``, docs in docs/security.md):

* TLS: with an ``ssl_context`` each connection is wrapped in an ``SSLStream``
  and handshaken before anything else, so HTTPS and WSS share the port.  The
  first byte is peeked first: a plain-HTTP client gets a plain 400 instead of
  a broken handshake.  A failed or slow handshake closes that connection only.
* Connections: ``connections`` counts the live connection tasks (HTTP and
  upgraded WebSocket alike).  One that arrives when the count is at
  ``max_connections`` gets a 503 and is closed without its request being read.
* Deadlines on reads, never on answers: each read from a connection has a
  deadline chosen by where the reader is (``RequestReader.phase``).  The first
  request's head must be complete within ``header_timeout_s`` of the connection
  opening (a TLS handshake included), every later head within
  ``header_timeout_s`` of its first byte, and each read inside a body within
  ``header_timeout_s`` of the one before; otherwise 408.  Between requests a
  keep-alive connection may sit idle for ``keepalive_timeout_s``, then it is
  closed without a word.  While a request is being answered (a long-poll, an
  SSE stream) the connection is not read at all, so no deadline runs; an
  upgraded WebSocket has its own hello timeout and heartbeat.
* Publish rate: each connection has a token bucket; a POST under
  ``/v1/stream/`` takes a token or gets a 429 with Retry-After, unstored.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import ssl
from pathlib import Path

import trio

from ._broker import Broker
from ._http import (
    BadRequest,
    Phase,
    Request,
    RequestReader,
    Responder,
    closing_error,
    error,
    error_body,
    error_response,
    response,
)
from ._limits import HttpLimits, TokenBucket
from ._handshake import HandshakeError, server_handshake
from ._streams import STREAM_PREFIX, StreamsApi
from ._ws import WS_PATH, WsServer

log = logging.getLogger("broker.http")


def make_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context for HTTPS and WSS on the same port: TLS 1.2 or later."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # A client-started renegotiation costs the server a handshake per request
    # (OpenSSL 3 refuses it already; 1.1.1 needs telling).
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.load_cert_chain(cert_file, key_file)
    return context


_STATIC = Path(__file__).parent / "static"
# path -> (file in broker/static, content type, served only with --demo)
_STATIC_ROUTES = {
    "/client/broker.js": ("broker.js", "text/javascript; charset=utf-8", False),
    "/demo": ("demo.html", "text/html; charset=utf-8", True),
}

_TLS_HANDSHAKE = 0x16      # the first byte of every TLS connection (a handshake record)
_RETRY_AFTER_FULL_S = 1    # what a client refused for too many connections is told to wait


_LOCAL_HOST = re.compile(r"(?:localhost|127(?:\.\d{1,3}){3}|\[::1\])(?::\d{1,5})?",
                         re.IGNORECASE)
_LOCAL_ORIGIN = re.compile(r"https?://" + _LOCAL_HOST.pattern, re.IGNORECASE)


def foreign(req: Request) -> str | None:
    """Why a request to an open broker on loopback does not come from this
    machine's own pages, or None.  Without a token check, two things would
    let any web page the user visits use the broker: CORS (``Origin`` is
    the page's, and every answer allows it) and DNS rebinding (a foreign
    name resolved to 127.0.0.1: ``Host`` is that name).  Clients that are
    not browsers send no ``Origin``, and a loopback ``Host``."""
    host = req.header(b"host")
    if host is not None and not _LOCAL_HOST.fullmatch(host.strip()):
        return (f"auth is off, so this broker answers only requests for localhost, "
                f"not {host.strip()[:100]!r}; turn on --auth-secret to serve other names")
    origin = req.header(b"origin")
    if origin is not None and not _LOCAL_ORIGIN.fullmatch(origin.strip()):
        return (f"auth is off, so this broker answers only pages served from this machine, "
                f"not {origin.strip()[:100]!r}; turn on --auth-secret to serve others")
    return None


class HttpServer:
    """Routes requests: /healthz, and the Durable Streams API under /v1/stream/."""

    def __init__(self, broker: Broker, streams: StreamsApi | None = None,
                 ws: WsServer | None = None, limits: HttpLimits | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 local_only: bool = False, demo: bool = False) -> None:
        self.broker = broker
        self.demo = demo              # serve the demo page at /demo
        # Open mode on a loopback address: only this machine's pages may use
        # the API (see ``foreign``).
        self.local_only = local_only
        self.streams = streams or StreamsApi(broker)
        self.ws = ws or WsServer(broker)
        self.limits = limits or HttpLimits()
        self.ssl_context = ssl_context
        self.closing = False          # set on shutdown: finish the current request, then close
        self.connections = 0          # live connection tasks, refused ones too while they last

    async def handle(self, req: Request, out: Responder) -> None:
        path = req.target.split("?", 1)[0]
        # A CORS preflight carries no data either way: the request it asks
        # about is refused on its own.
        if self.local_only and path.startswith("/v1/") and req.method != "OPTIONS" \
                and (why := foreign(req)):
            await out.send(error(403, "origin_refused", why))
        elif path.startswith(STREAM_PREFIX):
            await self.streams.handle(req, out)
        elif path == "/healthz":
            if req.method not in ("GET", "HEAD"):
                await out.send(error(405, "method_not_allowed", "use GET"))
            else:
                await out.send(response(200, b'{"status":"ok"}', keep_alive=req.keep_alive))
        elif path in _STATIC_ROUTES and (self.demo or not _STATIC_ROUTES[path][2]):
            await self._static(req, out, *_STATIC_ROUTES[path][:2])
        elif req.method == "OPTIONS":
            await out.send(response(204, b""))
        else:
            await out.send(response(404, error_body("not_found", f"no route for {path}"),
                                    keep_alive=req.keep_alive))

    @staticmethod
    async def _static(req: Request, out: Responder, file: str, content_type: str) -> None:
        if req.method not in ("GET", "HEAD"):
            await out.send(error(405, "method_not_allowed", "use GET"))
            return
        try:
            body = await trio.Path(_STATIC / file).read_bytes()
        except OSError:
            await out.send(error(404, "not_found", f"{file} is not installed with this broker"))
            return
        await out.send(response(200, body, content_type=content_type,
                                keep_alive=req.keep_alive,
                                headers=[("cache-control", "no-cache")]))

    async def serve_connection(self, tcp: trio.SocketStream) -> None:
        """One connection's task: what ``trio.serve_tcp`` calls.  Whatever
        happens on it stays on it: an error here must never reach the
        listener, which would stop serving."""
        deadline = trio.current_time() + self.limits.header_timeout_s
        # Refused connections count while they last, so a flood of them is
        # refused too rather than let through while earlier ones close.
        refused = self.connections >= self.limits.max_connections
        self.connections += 1
        stream: trio.abc.Stream = tcp
        try:
            if self.ssl_context is not None:
                secured = await self._handshake(tcp, self.ssl_context, deadline)
                if secured is None:
                    return
                stream = secured
            if refused:
                await self._send_closing(stream, closing_error(
                    503, "too_many_connections",
                    f"the server is at its limit of {self.limits.max_connections} connections",
                    headers=[("retry-after", str(_RETRY_AFTER_FULL_S))]))
                return
            await self._serve_connection(stream, deadline)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass                    # the client went away
        except Exception:
            log.exception("connection failed")
        finally:
            self.connections -= 1
            # aclose closes the transport even if cancelled; the bound only
            # stops a TLS close_notify from waiting on a peer that never reads.
            with trio.move_on_after(1):
                await stream.aclose()

    async def _handshake(self, tcp: trio.SocketStream, context: ssl.SSLContext,
                         deadline: float) -> trio.SSLStream[trio.SocketStream] | None:
        """The TLS stream over ``tcp``, handshaken by ``deadline``; None when
        the connection is to be dropped (after a 400 to a plain-HTTP client)."""
        with trio.move_on_at(deadline):
            try:
                # Peeked, not read: the handshake reads it again.
                first = await tcp.socket.recv(1, socket.MSG_PEEK)
            except OSError as exc:
                log.debug("connection lost before TLS: %r", exc)
                return None
            if not first:
                return None
            if first[0] != _TLS_HANDSHAKE:
                # Read what came, so the close is a FIN after the answer and
                # not a reset that could destroy it.
                await tcp.receive_some(65536)
                await self._send_closing(tcp, closing_error(
                    400, "tls_required", "this port speaks TLS: use https:// or wss://"))
                return None
            tls = trio.SSLStream(tcp, context, server_side=True, https_compatible=True)
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                log.debug("TLS handshake failed: %r", exc.__cause__ or exc)
                return None
            return tls
        log.debug("TLS handshake not done within %.1f s", self.limits.header_timeout_s)
        return None

    async def _send_closing(self, stream: trio.abc.Stream, data: bytes) -> None:
        """A last answer before the connection closes, bounded: a peer that
        does not read cannot keep the connection by it."""
        with trio.move_on_after(self.limits.header_timeout_s):
            await stream.send_all(data)

    async def _serve_connection(self, stream: trio.abc.Stream, deadline: float) -> None:
        limits = self.limits
        reader = RequestReader(limits.max_body_bytes)
        bucket = TokenBucket(limits.publish_rate, limits.publish_burst)
        served = False          # a request was answered: idling now is keep-alive
        while True:
            data: bytes | bytearray | None = None
            with trio.move_on_at(deadline):
                data = await stream.receive_some(65536)
            if data is None:
                if reader.phase is Phase.IDLE and served:
                    return          # an idle keep-alive connection: closed without a word
                what = "request body" if reader.phase is Phase.BODY else "request head"
                await self._send_closing(stream, closing_error(
                    408, "request_timeout",
                    f"the {what} did not arrive within {limits.header_timeout_s:g} s"))
                return
            if not data:
                return
            before = reader.phase
            try:
                requests = reader.feed(data)
            except BadRequest as exc:
                await stream.send_all(error_response(exc))
                return
            for req in requests:
                if req.upgrade and req.target.split("?", 1)[0] == WS_PATH:
                    await self._upgrade(stream, req, reader.leftover)
                    return
                out = Responder(stream, req.method)
                try:
                    wait = self._rate_wait(req, bucket)
                    if wait:
                        await out.send(error(
                            429, "rate_limited", f"at most {limits.publish_rate:g} appends per "
                            "second on one connection",
                            headers=[("retry-after", str(max(1, math.ceil(wait))))]))
                    else:
                        await self.handle(req, out)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return          # the client went away mid-response
                except Exception:
                    # The path only: a query may hold a token.
                    log.exception("%s %s failed", req.method, req.target.split("?", 1)[0])
                    if not out.sent:
                        await stream.send_all(error(500, "internal", "internal error"))
                    return
                if not req.keep_alive or self.closing or req.upgrade:
                    return      # shutting down: no more requests on this one
            if reader.error is not None:        # garbage after those requests
                await stream.send_all(error_response(reader.error))
                return
            # The next read's deadline; a phase that goes on keeps its own.
            now = trio.current_time()
            phase = reader.phase
            if phase is Phase.BODY:
                deadline = now + limits.header_timeout_s        # per read of a body
            elif requests or (served and before is Phase.IDLE and phase is Phase.HEAD):
                # Timed from now, not from when the bytes came: a head
                # pipelined behind a long answer starts its clock here.
                deadline = now + (limits.keepalive_timeout_s if phase is Phase.IDLE
                                  else limits.header_timeout_s)
            served = served or bool(requests)

    @staticmethod
    def _rate_wait(req: Request, bucket: TokenBucket) -> float:
        """0 if ``req`` may go ahead, else the seconds until it could."""
        if req.method != "POST" or not req.target.startswith(STREAM_PREFIX):
            return 0.0
        return bucket.take()

    async def _upgrade(self, stream: trio.abc.Stream, req: Request, leftover: bytes) -> None:
        try:
            accepted = server_handshake(req.method, req.headers)
        except HandshakeError as exc:
            await stream.send_all(error(exc.status, exc.code, exc.message,
                                        headers=list(exc.headers)))
            return
        if self.closing:
            await stream.send_all(error(503, "unavailable", "the server is shutting down"))
            return
        if self.local_only and (why := foreign(req)):
            await stream.send_all(error(403, "origin_refused", why))
            return
        await stream.send_all(accepted)
        await self.ws.serve(stream, leftover, req.target)
