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
_ws.py.
"""

from __future__ import annotations

import logging
import ssl

import trio

from ._broker import Broker
from ._http import (
    BadRequest,
    Request,
    RequestReader,
    Responder,
    error,
    error_body,
    error_response,
    response,
)
from ._limits import HttpLimits
from ._handshake import HandshakeError, server_handshake
from ._streams import STREAM_PREFIX, StreamsApi
from ._ws import WS_PATH, WsServer

log = logging.getLogger("broker.http")


def make_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context for HTTPS and WSS on the same port: TLS 1.2 or later."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


class HttpServer:
    """Routes requests: /healthz, and the Durable Streams API under /v1/stream/."""

    def __init__(self, broker: Broker, streams: StreamsApi | None = None,
                 ws: WsServer | None = None, limits: HttpLimits | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.broker = broker
        self.streams = streams or StreamsApi(broker)
        self.ws = ws or WsServer(broker)
        self.limits = limits or HttpLimits()
        self.ssl_context = ssl_context
        self.closing = False          # set on shutdown: finish the current request, then close

    async def handle(self, req: Request, out: Responder) -> None:
        path = req.target.split("?", 1)[0]
        if path.startswith(STREAM_PREFIX):
            await self.streams.handle(req, out)
        elif path == "/healthz":
            if req.method not in ("GET", "HEAD"):
                await out.send(error(405, "method_not_allowed", "use GET"))
            else:
                await out.send(response(200, b'{"status":"ok"}', keep_alive=req.keep_alive))
        elif req.method == "OPTIONS":
            await out.send(response(204, b""))
        else:
            await out.send(response(404, error_body("not_found", f"no route for {path}"),
                                    keep_alive=req.keep_alive))

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        """One connection's task.  Whatever happens on it stays on it: an
        error here must never reach the listener, which would stop serving."""
        try:
            await self._serve_connection(stream)
        except Exception:
            log.exception("connection failed")

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
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
                        await stream.send_all(error_response(exc))
                        return
                    for req in requests:
                        if req.upgrade and req.target.split("?", 1)[0] == WS_PATH:
                            await self._upgrade(stream, req, reader.leftover)
                            return
                        out = Responder(stream, req.method)
                        try:
                            await self.handle(req, out)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            return          # the client went away mid-response
                        except Exception:
                            log.exception("%s %s failed", req.method, req.target)
                            if not out.sent:
                                await stream.send_all(error(500, "internal", "internal error"))
                            return
                        if not req.keep_alive or self.closing or req.upgrade:
                            return      # shutting down: no more requests on this one
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass



    async def _upgrade(self, stream: trio.SocketStream, req: Request, leftover: bytes) -> None:
        try:
            accepted = server_handshake(req.method, req.headers)
        except HandshakeError as exc:
            await stream.send_all(error(exc.status, exc.code, exc.message,
                                        headers=list(exc.headers)))
            return
        if self.closing:
            await stream.send_all(error(503, "unavailable", "the server is shutting down"))
            return
        await stream.send_all(accepted)
        await self.ws.serve(stream, leftover, req.target)
