"""The Python client for the WebSocket protocol (docs/protocol.md), for Trio and asyncio.

A client names a session; from then on it gets every record exactly once, in
order, across dropped sockets, and its publishes land exactly once.  Callers
never write reconnect or catch-up logic::

    async with broker.client.connect("ws://127.0.0.1:4437/v1/ws", client_id="ui-1") as c:
        s = c.session("chat/42")
        offsets = await s.publish([b"Hel", b"lo"], create=True)
        async for record in s.subscribe(offset="-1"):
            print(record.offset, record.payload)

It is written once on anyio, so the same code runs under ``trio.run`` and
``asyncio.run``.

Theory of operation
-------------------
Four layers, each usable on its own:

1. ``_WsCodec`` is the client half of RFC 6455, sans-IO: it writes the upgrade
   request (_handshake), checks the 101, turns bytes into whole messages with
   the compiled ``FrameParser`` and builds masked frames.  No socket.

2. A **transport** moves protocol frames (_frames) to and from the server:
   ``send``, ``receive``, ``close`` (the closing handshake) and ``aclose``
   (drop it now); that is the whole ``Transport`` protocol.
   ``WebSocketTransport`` puts the codec on an anyio byte stream (TCP, or TLS
   for ``wss://``), answers WebSocket pings and does the closing handshake.
   ``HttpTransport`` plays the server's half of that protocol locally over
   the Durable Streams HTTP API (SSE or long-poll reads with
   ``view=records``, POSTs with the producer headers), for networks that do
   not pass WebSockets.  ``connect(transports=...)`` tries them in order and
   gives up one that fails to open twice while the broker answers plain
   HTTP; ``connect(dial=...)`` takes any other dialer.

3. ``Connection`` is one connection's protocol: ``hello``, requests answered
   by id, each attached session's frames routed to its sink, the server's
   ``ping`` answered, and silence for two heartbeats taken as a dead link.
   When it ends, every waiting request and sink hears why, once.
   ``open_connection`` hands it out as it is, for tests and tools that want
   the protocol without help: it never reconnects.

4. ``Client`` (from ``connect``) keeps one *logical* connection over any
   number of real ones.  A supervisor task dials, says hello with the current
   token, and when a connection ends for a reason that may pass (a cut, a
   server restart, a heartbeat timeout, a 503 at the upgrade) waits a growing,
   fully jittered delay (``Backoff``) and dials again; a reason that will not
   pass (a refused token, a bad URL) closes the client with that error, which
   every waiting call raises.  Everything the client promises lives on the
   client, never on a connection:

   * A ``Subscription`` holds the offset after the last record it received and
     the session's epoch.  On every new connection it attaches again from
     there with that epoch, so what it yields has no gap and no duplicate; an
     epoch change ends it with ``EpochChanged``.  Records received and not yet
     yielded wait in its buffer, which credit bounds to ``window`` records, so
     a slow consumer slows its own subscription and nothing else.  The offset
     after the last record *yielded* is its ``cursor``, which a caller may save
     and pass back to a later ``subscribe``.

   * A session's publishes go through its ``_Pipeline``: a queue of publish
     calls, and the batches already sent and not yet acknowledged, each
     stamped (producer id, epoch, seq).  A batch keeps its records and its
     stamp for life, so sending it again (on a new connection, or after
     ``rate_limited``) appends it at most once: the server answers a repeat
     with ``dup``.  Calls queued while earlier batches are on the wire are
     merged into one batch, so a busy publisher sends fewer, larger frames.

   Signals are publishes of kind 1, so they go through the same pipeline
   and land exactly once, in order with the client's other publishes.

   The AI message model (docs/ai.md) is built on these: ``MessageStream``
   writes a message as a start, deltas batched by ``_convo.Coalescer``, and
   an end with its outcome; the typed signals and messages encode text by
   the session's payload rule (``Session.is_json``); a ``Conversation``
   folds a session's records into whole messages, starting from the
   broker's view when the WebSocket offers one.  ``broker.agent`` is the
   agent's side on top of them.

   The server keeps producer state per publisher, so a client that did not
   name itself keeps the name the server gave it on its first connection,
   and names itself with it over HTTP too (``Broker-Client``): a publish in
   flight when the client moves from the WebSocket to HTTP is then a
   duplicate there, not a second copy.

   One *pump* task per connection sends attaches, credit and batches, woken
   by ``_poke``: it alone decides their order, and whatever piles up while
   it is busy goes out together.  (Other frames, a pong or a detach, come
   from other tasks; the transport's lock keeps every frame whole.)

Errors are raised in the caller's task, never out of a background task: the
supervisor and the pump record what happened and wake whoever waits.
"""

from __future__ import annotations

import enum
import functools
import importlib.util
import itertools
import base64
import json
import logging
import math
import os
import random
import secrets
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Generic, Protocol, TypeVar
from urllib.parse import quote, urlsplit

import anyio
import anyio.abc
import msgpack

from . import _convo, _core, _frames
from ._frames import Ack, Attached, Data, Event, Member, Record, UpToDate
from ._handshake import HandshakeError, check_server_response, client_request
from ._meta import media_type
from ._offsets import format_offset, parse_offset_text
from ._session import NOW, START

__all__ = [
    "Attachment", "Backoff", "Client", "ClientClosed", "ClientError", "CloseInfo", "Connection",
    "ConnectionLost", "Conversation", "Cursor", "EpochChanged", "MessageStream", "Record",
    "Session", "SessionDeleted", "SessionEnded", "Signal", "State", "Subscription", "Transport",
    "TransportClosed", "HttpTransport", "WebSocketTransport", "connect", "dial_http",
    "dial_websocket", "open_connection", "Member", "PresenceEvent",
]

logger = logging.getLogger("broker.client")

T = TypeVar("T")

MAX_SERVER_MESSAGE: Final = 64 << 20   # a data frame of big records may pass 1 MiB
_MAX_HEAD: Final = 16 << 10            # an upgrade response longer than this is not one


# ================================================================ errors and values

class ClientError(Exception):
    """The server refused something (``code`` is its stable error code), or
    the client could not do it (``connection_lost``, ``client_closed``, ...).

    ``session`` names the session it concerns, if one; ``retry_after`` is the
    server's hint in seconds for ``rate_limited``."""

    def __init__(self, code: str, message: str, session: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.session = session
        self.retry_after = retry_after


def _client_error(frame: _frames.Error) -> ClientError:
    return ClientError(frame.code, frame.message, frame.session, frame.retry_after)


@dataclass(frozen=True, slots=True)
class CloseInfo:
    """How a connection ended: the WebSocket close code and reason (1006, as
    RFC 6455 names it, when it ended without a close frame)."""

    code: int
    reason: str


class ConnectionLost(ClientError):
    """The connection ended (``close`` says how).  From a ``Client`` this is
    only raised when it gave up reconnecting (``Backoff.give_up_after``)."""

    def __init__(self, close: CloseInfo, message: str | None = None) -> None:
        super().__init__("connection_lost", message or
                         f"the connection closed ({close.code} {close.reason})".rstrip())
        self.close = close


class ClientClosed(ClientError):
    """The client was closed by its owner while this was waiting."""

    def __init__(self) -> None:
        super().__init__("client_closed", "the client is closed")


class SessionEnded(ClientError):
    """The subscription ended with an event: ``closed``, ``deleted`` or
    ``epoch_changed`` (then ``epoch`` is the new one)."""

    def __init__(self, session: str, event: str, epoch: int | None) -> None:
        super().__init__(event, f"session {session!r}: {event}", session)
        self.event = event
        self.epoch = epoch


class EpochChanged(SessionEnded):
    """The session was deleted and created again: offsets of the old epoch
    mean nothing in the new one.  Discard what was read and subscribe again
    from ``"-1"``.  ``old_epoch`` is the one the cursor belonged to."""

    def __init__(self, session: str, old_epoch: int | None, epoch: int | None) -> None:
        super().__init__(session, "epoch_changed", epoch)
        self.old_epoch = old_epoch


class SessionDeleted(SessionEnded):
    """The session was deleted."""

    def __init__(self, session: str) -> None:
        super().__init__(session, "deleted", None)


def _ended(session: str, frame: Event, old_epoch: int | None) -> SessionEnded:
    if frame.event == "epoch_changed":
        return EpochChanged(session, old_epoch, frame.epoch)
    if frame.event == "deleted":
        return SessionDeleted(session)
    return SessionEnded(session, frame.event, frame.epoch)


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a subscription goes on from: ``offset`` is the next record to
    read, ``epoch`` the session epoch that offset belongs to (None if not yet
    known).  ``str(cursor)`` is a short text form, ``"<epoch>:<offset>"``,
    that ``Cursor.parse`` and ``subscribe(offset=...)`` read back."""

    offset: int
    epoch: int | None = None

    def __str__(self) -> str:
        offset = {START: "-1", NOW: "now"}.get(self.offset, str(self.offset))
        return offset if self.epoch is None else f"{self.epoch}:{offset}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """``"<epoch>:<offset>"``, or an offset alone (an integer, ``"-1"``,
        ``"now"`` or an HTTP offset).  Raises ValueError."""
        epoch_text, sep, offset_text = text.rpartition(":")
        epoch = None
        if sep:
            if not epoch_text.isascii() or not epoch_text.isdigit():
                raise ValueError(f"bad cursor {text[:60]!r}: the epoch must be an integer")
            epoch = int(epoch_text)
        if offset_text.isascii() and offset_text.isdigit():
            return cls(int(offset_text), epoch)
        try:
            return cls(_frames.parse_offset(offset_text), epoch)
        except _frames.FrameError:
            raise ValueError(f"bad cursor {text[:60]!r}") from None


def _start_of(offset: int | str | Cursor, epoch: int | None) -> Cursor:
    if isinstance(offset, Cursor):
        start = offset
    elif isinstance(offset, str):
        start = Cursor.parse(offset)
    else:
        try:
            start = Cursor(_frames.parse_offset(offset))
        except _frames.FrameError:
            raise ValueError(f"bad offset {offset!r}") from None
    if epoch is not None:
        if start.epoch is not None and start.epoch != epoch:
            raise ValueError(f"the cursor is of epoch {start.epoch}, not {epoch}")
        start = Cursor(start.offset, epoch)
    return start


class State(enum.Enum):
    CONNECTING = "connecting"        # the first connection is being made
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"    # the connection was lost; waiting or dialling again
    CLOSED = "closed"                # by its owner, or by an error that retrying cannot fix


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long to wait before reconnecting: attempt ``n`` (from 0) waits a
    uniformly random time in ``[0, min(maximum, initial * multiplier**n))``
    ("full jitter"), so clients cut off together do not return together.  The
    attempt count starts again at 0 once a connection has stayed up for
    ``maximum`` seconds.  With ``give_up_after``, the client closes with
    ``ConnectionLost`` after that many seconds without a connection."""

    initial: float = 0.1
    maximum: float = 10.0
    multiplier: float = 2.0
    give_up_after: float | None = None

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum and self.multiplier >= 1):
            raise ValueError("need 0 < initial <= maximum and multiplier >= 1")
        if self.give_up_after is not None and self.give_up_after < 0:
            raise ValueError("give_up_after must not be negative")

    def cap(self, attempt: int) -> float:
        """The most attempt ``attempt`` may wait."""
        # Compare exponents, not powers: initial * multiplier**1000 overflows.
        if self.multiplier == 1 or attempt < math.log(self.maximum / self.initial,
                                                      self.multiplier):
            return min(self.maximum, self.initial * self.multiplier ** attempt)
        return self.maximum

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        return (rng or random).uniform(0, self.cap(attempt))


# ================================================================ sans-IO WebSocket, client side

class _WsCodec:
    """The client end of one WebSocket connection, as bytes in and bytes out.

    ``request`` is the upgrade request to send first.  ``receive_data`` takes
    what the server sent and returns the messages it completes, as
    ``(opcode, payload)``; it raises HandshakeError if the server refused the
    upgrade.  After a framing violation ``error`` is set (the messages before
    it are still returned).  ``message``, ``pong`` and ``close`` build the
    masked frames a client sends."""

    def __init__(self, host: str, target: str, max_message: int = MAX_SERVER_MESSAGE) -> None:
        self.request, self._key = client_request(host, target)
        self.open = False                     # the 101 was checked
        self._head = bytearray()
        self._parser = _core.FrameParser(True, max_message)

    @property
    def error(self) -> _core.WsProtocolError | None:
        return self._parser.error

    def receive_data(self, data: bytes) -> list[tuple[int, bytes]]:
        if not self.open:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > _MAX_HEAD:
                    raise HandshakeError(0, "bad_handshake", "the upgrade response is too long")
                return []
            check_server_response(bytes(self._head[:end]), self._key)
            self.open = True
            data = bytes(self._head[end + 4:])
            self._head.clear()
            if not data:
                return []
        return self._parser.feed(data)

    @staticmethod
    def _masked(op: int, payload: bytes) -> bytes:
        return _core.build_frame(op, payload, mask=os.urandom(4))

    def message(self, payload: bytes) -> bytes:
        return self._masked(_core.OP_BINARY, payload)

    def pong(self, payload: bytes) -> bytes:
        return self._masked(_core.OP_PONG, payload)

    def close(self, code: int, reason: str = "") -> bytes:
        # A control frame holds 125 bytes: the code's 2 and at most 123 of reason.
        short = reason.encode()[:123].decode(errors="ignore")
        return self._masked(_core.OP_CLOSE, _core.close_payload(code, short))


# ================================================================ transports

class TransportClosed(Exception):
    """The transport has ended; ``close`` says how."""

    def __init__(self, close: CloseInfo) -> None:
        super().__init__(f"{close.code} {close.reason}")
        self.close = close


class Transport(Protocol):
    """What a Connection needs from the link under it: protocol frames each way."""

    async def send(self, frame: _frames.ClientFrame) -> None:
        """Send one frame.  Raises TransportClosed if the link has ended."""

    async def receive(self) -> _frames.ServerFrame:
        """The next frame.  Raises TransportClosed once the link has ended
        (after every frame that came before the end)."""

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake; ``receive`` ends when the server answers."""

    async def aclose(self) -> None:
        """Drop the link now, and release it."""


_LINK_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class WebSocketTransport:
    """Protocol frames over one WebSocket connection (``_WsCodec`` on an anyio
    byte stream).  Sends may come from several tasks: a lock keeps each frame
    whole on the wire.  One task receives."""

    def __init__(self, stream: anyio.abc.ByteStream, codec: _WsCodec,
                 early: Iterable[tuple[int, bytes]] = ()) -> None:
        self._stream = stream
        self._codec = codec
        self._lock = anyio.Lock()
        self._early = list(early)             # messages that came with the 101
        self._inbox: deque[_frames.ServerFrame] = deque()
        self._close_sent = False
        self.closed: CloseInfo | None = None  # set when the link has ended

    async def send(self, frame: _frames.ClientFrame) -> None:
        await self._send_bytes(self._codec.message(_frames.encode(frame)))

    async def _send_bytes(self, data: bytes, closing: bool = False) -> None:
        if self.closed is not None or (self._close_sent and not closing):
            raise TransportClosed(self.closed or CloseInfo(1000, "closing"))
        async with self._lock:
            try:
                await self._stream.send(data)
            except _LINK_ERRORS as exc:
                self._lost(f"send failed: {exc or type(exc).__name__}")
                assert self.closed is not None
                raise TransportClosed(self.closed) from None

    def _lost(self, reason: str) -> None:
        if self.closed is None:
            self.closed = CloseInfo(1006, reason)

    async def receive(self) -> _frames.ServerFrame:
        while not self._inbox:
            if self.closed is not None:
                raise TransportClosed(self.closed)
            if self._early:
                messages, self._early = self._early, []
            else:
                try:
                    data = await self._stream.receive(65536)
                except anyio.EndOfStream:
                    self._lost("the server closed the connection without a close frame")
                    continue
                except _LINK_ERRORS as exc:
                    self._lost(f"receive failed: {exc or type(exc).__name__}")
                    continue
                messages = self._codec.receive_data(data)
            for op, payload in messages:
                if self.closed is not None:
                    break
                await self._on_message(op, payload)
            error = self._codec.error
            if error is not None and self.closed is None:
                await self._fail(error.code, error.reason)
        return self._inbox.popleft()

    async def _on_message(self, op: int, payload: bytes) -> None:
        if op == _core.OP_BINARY:
            try:
                frame = _frames.decode(payload)
            except _frames.FrameError as exc:
                await self._fail(1002, f"the server sent a bad frame: {exc.message}")
                return
            if not isinstance(frame, _frames.ServerFrame):
                await self._fail(1002, f"the server sent a client frame "
                                       f"({type(frame).__name__.lower()})")
                return
            self._inbox.append(frame)
        elif op == _core.OP_PING:
            try:
                await self._send_bytes(self._codec.pong(payload))
            except TransportClosed:
                pass
        elif op == _core.OP_CLOSE:
            try:
                code, reason = _core.parse_close(payload)
            except _core.WsProtocolError as exc:
                await self._fail(exc.code, exc.reason)
                return
            if not self._close_sent:
                self._close_sent = True
                try:
                    with anyio.move_on_after(1):
                        await self._send_bytes(self._codec.close(1000 if code == 1005 else code),
                                               closing=True)
                except TransportClosed:
                    pass
            self.closed = CloseInfo(code, reason)
        elif op == _core.OP_TEXT:
            await self._fail(1003, "the server sent a text message")

    async def _fail(self, code: int, reason: str) -> None:
        """The server broke the protocol: say so, and end the link."""
        await self.close(code, reason)
        self.closed = CloseInfo(code, reason)
        await self.aclose()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self._close_sent or self.closed is not None:
            return
        self._close_sent = True
        try:
            with anyio.move_on_after(1):
                await self._send_bytes(self._codec.close(code, reason), closing=True)
        except TransportClosed:
            pass

    async def aclose(self) -> None:
        self._lost("closed by the client")
        with anyio.CancelScope(shield=True), anyio.move_on_after(1):
            await self._stream.aclose()


Dial = Callable[[str], Awaitable[Transport]]


class _DialError(ClientError):
    """A dial that failed; ``permanent`` if trying again cannot help."""

    def __init__(self, code: str, message: str, permanent: bool) -> None:
        super().__init__(code, message)
        self.permanent = permanent


async def dial_websocket(url: str, *, ssl_context: ssl.SSLContext | None = None,
                         timeout: float = 10.0,
                         max_message: int = MAX_SERVER_MESSAGE) -> WebSocketTransport:
    """Open a WebSocket to ``url`` (``ws://`` or ``wss://``; a query such as
    ``?token=`` is kept) offering the ``broker.v1`` subprotocol.  Raises
    ClientError: ``bad_url``, ``connect_failed``, ``tls_failed`` or
    ``bad_handshake`` (with the HTTP status in the message)."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise _DialError("bad_url", f"not a ws:// or wss:// URL: {url[:100]!r}", True)
    tls = parts.scheme == "wss"
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError:
        raise _DialError("bad_url", f"bad port in {url[:100]!r}", True) from None
    host = parts.hostname
    host_header = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        host_header += f":{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    stream: anyio.abc.ByteStream | None = None
    try:
        with anyio.fail_after(timeout):
            if tls:
                # Not standard_compatible: no waiting for the server's
                # close_notify, which WebSocket's own close makes moot.
                stream = await anyio.connect_tcp(host, port, tls=True, ssl_context=ssl_context,
                                                 tls_hostname=host,
                                                 tls_standard_compatible=False)
            else:
                stream = await anyio.connect_tcp(host, port)
            codec = _WsCodec(host_header, target, max_message)
            await stream.send(codec.request)
            early: list[tuple[int, bytes]] = []
            while not codec.open:
                early += codec.receive_data(await stream.receive(65536))
    except HandshakeError as exc:
        await _drop(stream)
        # A 5xx or 429 (e.g. the server's connection limit) passes; a 4xx does not.
        permanent = exc.code == "bad_subprotocol" or (400 <= exc.status < 500
                                                      and exc.status not in (408, 429))
        raise _DialError(exc.code, f"{exc} (HTTP status {exc.status})", permanent) from None
    except ssl.SSLCertVerificationError as exc:
        await _drop(stream)
        raise _DialError("tls_failed", f"TLS: {exc.verify_message or exc}", True) from None
    except TimeoutError:
        await _drop(stream)
        raise _DialError("connect_failed", f"no WebSocket within {timeout:g} s", False) from None
    except (anyio.EndOfStream, *_LINK_ERRORS, ssl.SSLError) as exc:
        await _drop(stream)
        cause = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLCertVerificationError) else None
        if cause is not None:
            raise _DialError("tls_failed", f"TLS: {cause.verify_message or cause}",
                             True) from None
        raise _DialError("connect_failed", f"{host}:{port}: {exc or type(exc).__name__}",
                         False) from None
    except BaseException:
        await _drop(stream)
        raise
    return WebSocketTransport(stream, codec, early)


async def _drop(stream: anyio.abc.ByteStream | None) -> None:
    if stream is not None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(1):
            await stream.aclose()


# ================================================================ HTTP transports (SSE, long-poll)

_HTTP_RETRY_STATUSES: Final = frozenset({408, 429})
# The broker's body of several records (_streams.RECORDS_TYPE; the client
# does not import the server's modules).
RECORDS_TYPE: Final = "application/vnd.broker.records+msgpack"


def _http_base(ws_url: str) -> str | None:
    """The HTTP base URL of the broker behind a ``ws(s)://host/.../v1/ws``
    URL (None if the URL does not end in ``/v1/ws``: then there is no
    Durable Streams API to fall back to)."""
    parts = urlsplit(ws_url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc or not parts.path.endswith("/v1/ws"):
        return None
    scheme = "https" if parts.scheme == "wss" else "http"
    return f"{scheme}://{parts.netloc}{parts.path[:-len('/v1/ws')]}"


class _HttpFailure(Exception):
    """A request of an HTTP transport failed: the link is lost."""


@functools.cache
def _body_class() -> type:
    """A request body type for httpx that is not an async generator: httpx
    wraps what it is given in one, which trio reports (a ResourceWarning)
    when a cut or a cancellation leaves it unfinished."""
    import httpx

    class Body(httpx.AsyncByteStream):
        def __init__(self, data: bytes) -> None:
            self._data: bytes | None = data

        def __aiter__(self) -> Body:
            return self

        async def __anext__(self) -> bytes:
            data, self._data = self._data, None
            if data is None:
                raise StopAsyncIteration
            return data

    return Body


class _Reader:
    """One attached session of an HttpTransport: its task's cancel scope, the
    credit the subscription granted (None: unlimited) and the session epoch
    its offsets belong to (the one asked for, then the one read)."""

    def __init__(self, attach: _frames.Attach) -> None:
        self.attach = attach
        self.credit = attach.credit
        self.epoch = attach.epoch
        self.more = anyio.Event()
        self.scope = anyio.CancelScope()


class HttpTransport:
    """Protocol frames over the Durable Streams HTTP API, for a network that
    does not pass WebSockets: ``mode`` is ``"sse"`` or ``"longpoll"``.

    It plays the server's half of the WebSocket protocol locally, so the
    Connection and Client above it do not know the difference:

    * ``hello`` is a plain request (``GET /v1/stream/``) with the token as
      ``Authorization: Bearer``: a 404 proves the broker answers and the
      token verifies (a 401 is the refusal), and the transport answers
      ``welcome`` itself.  Its heartbeat is an hour: liveness comes from the
      HTTP read timeout, the server sending SSE keep-alives and long-poll
      answers well within it.
    * ``attach`` starts a task that reads ``?view=records`` (kinds, offsets,
      publishers and meta with every record) from the offset asked: one
      catch-up GET (answered ``attached``, then its records), then
      ``live=sse`` or catch-up and ``live=long-poll`` GETs, each from the
      last ``Stream-Next-Offset``.  Records are handed on only as far as the
      subscription's credit goes; past it the task stops reading, so credit
      bounds memory as on the WebSocket.
    * Every read answer carries ``Broker-Epoch``, the session's incarnation.
      ``attached`` gives it; a read of a subscription that resumes with an
      epoch, or that was attached, and finds another one ends it with the
      ``epoch_changed`` event, as the WebSocket does.  A resume refused for
      its offset (``offset_out_of_range``, ``offset_too_old``) asks a HEAD
      which epoch the session is at now, and is ``epoch_changed`` only if
      that differs.
    * ``publish`` becomes a POST with the producer stamp in ``Producer-Id``,
      ``-Epoch`` and ``-Seq`` (and ``Broker-Kind`` for kind != 0): a JSON
      session's payloads as one JSON array; one non-empty record of any
      other session as the body itself; several, or an empty one, as one
      ``application/vnd.broker.records+msgpack`` body, which the broker
      appends atomically.  ``Broker-Client`` names the client, so that with
      auth off the broker keys the producer by client id, as on the
      WebSocket, and a publish first sent there is recognised here.  One
      session's POSTs go one at a time, in order, since producer seqs must
      arrive in order.  A 204 (a retry of a stored append) is ``ack`` with
      ``dup``, with the offsets the broker gives (``Broker-First-Offset``,
      ``Stream-Next-Offset``) when it still knows them.  Record meta goes in
      ``Broker-Meta`` (a JSON array), so over HTTP it must be JSON values.
    * Any request that fails on the network ends the whole transport, as a
      cut WebSocket does; the client dials again and resumes every
      subscription and resends every unacknowledged publish.  A 401 ends it
      with the server's code, which the client handles as on the WebSocket.

    ``serve`` runs the background requests; the client runs it beside the
    connection.
    """

    def __init__(self, base: str, mode: str, http: Any, read_timeout: float) -> None:
        self.base = base
        self.mode = mode
        self.closed: CloseInfo | None = None
        self._http = http               # an httpx.AsyncClient
        self._read_timeout = read_timeout
        self._token: str | None = None
        self._client: str | None = None      # the client id, as the welcome gave it
        self._presence: str | None = None    # Broker-Presence: hello's info, as JSON
        self._inbox: deque[_frames.ServerFrame] = deque()
        self._wake = anyio.Event()
        self._stop = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._later: list[Callable[[], Awaitable[None]]] = []
        self._readers: dict[str, _Reader] = {}
        self._posts: dict[str, deque[_frames.Publish]] = {}
        self._types: dict[str, str] = {}     # session -> content type

    # ------------------------------------------------------------ Transport

    async def send(self, frame: _frames.ClientFrame) -> None:
        if self.closed is not None:
            raise TransportClosed(self.closed)
        if isinstance(frame, _frames.Hello):
            await self._hello(frame)
        elif isinstance(frame, _frames.Attach):
            reader = self._readers[frame.session] = _Reader(frame)
            self._spawn(lambda: self._read(reader))
        elif isinstance(frame, _frames.Credit):
            reader_ = self._readers.get(frame.session)
            if reader_ is not None and reader_.credit is not None:
                reader_.credit += frame.n
                reader_.more.set()
        elif isinstance(frame, _frames.Detach):
            gone = self._readers.pop(frame.session, None)
            if gone is None:
                self._put(_frames.Error("not_attached", f"not attached to {frame.session!r}",
                                        frame.session, frame.id))
            else:
                gone.scope.cancel()
                self._put(_frames.Detached(frame.id, frame.session))
        elif isinstance(frame, (_frames.Publish, _frames.Signal)):
            if isinstance(frame, _frames.Signal):
                frame = _frames.Publish(frame.id, frame.session, (frame.payload,), 1)
            queue = self._posts.get(frame.session)
            if queue is None:
                queue = self._posts[frame.session] = deque()
                name = frame.session
                self._spawn(lambda: self._post_loop(name))
            queue.append(frame)
        elif isinstance(frame, _frames.Refresh):
            self._token = frame.token        # the next request carries it
            self._put(_frames.Refreshed(frame.id))
        elif isinstance(frame, _frames.Presence):
            asked = frame
            self._spawn(lambda: self._members(asked))
        # A pong needs no answer: HTTP has no server pings.

    async def receive(self) -> _frames.ServerFrame:
        while not self._inbox:
            if self.closed is not None:
                raise TransportClosed(self.closed)
            self._wake = anyio.Event()
            await self._wake.wait()
        return self._inbox.popleft()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self._lost(CloseInfo(code, reason or "closed by the client"))

    async def aclose(self) -> None:
        self._lost(CloseInfo(1006, "closed by the client"))
        with anyio.CancelScope(shield=True), anyio.move_on_after(1):
            await self._http.aclose()

    async def serve(self) -> None:
        """Run the background requests until the transport ends."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            later, self._later = self._later, []
            for fn in later:
                tg.start_soon(self._guard, fn)
            await self._stop.wait()
            tg.cancel_scope.cancel()

    # ------------------------------------------------------------ plumbing

    def _put(self, frame: _frames.ServerFrame) -> None:
        if self.closed is None:
            self._inbox.append(frame)
            self._wake.set()

    def _lost(self, close: CloseInfo) -> None:
        if self.closed is None:
            self.closed = close
        self._wake.set()
        self._stop.set()

    def _spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        if self._tg is None:
            self._later.append(fn)
        else:
            self._tg.start_soon(self._guard, fn)

    async def _guard(self, fn: Callable[[], Awaitable[None]]) -> None:
        import httpx
        try:
            await fn()
        except (httpx.HTTPError, _HttpFailure, OSError, anyio.BrokenResourceError) as exc:
            self._lost(CloseInfo(1006, f"HTTP: {exc or type(exc).__name__}"))

    def _url(self, session: str) -> str:
        return f"{self.base}/v1/stream/{quote(session, safe='/:@+=,~-._')}"

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        # Who reads, for the broker's presence (and, with auth off, who publishes).
        if self._client is not None:
            headers.setdefault("Broker-Client", quote(self._client, safe=""))
        if self._presence is not None:
            headers["Broker-Presence"] = self._presence
        return headers

    @staticmethod
    def _error(resp: Any) -> tuple[str, str, float | None]:
        """The error code, message and Retry-After of an error response."""
        code, message = "", ""
        try:
            body = resp.json()["error"]
            code, message = str(body["code"]), str(body["message"])
        except Exception:
            pass
        if resp.status_code >= 500 and code not in _RETRY_CODES:
            code = "unavailable"
        code = code or ("rate_limited" if resp.status_code == 429 else f"http_{resp.status_code}")
        retry_after = None
        try:
            retry_after = float(resp.headers.get("retry-after", ""))
        except ValueError:
            pass
        return code, message or f"HTTP status {resp.status_code}", retry_after

    def _check_link(self, resp: Any) -> None:
        """End the transport for answers about the link, not the request: a
        refused token (401, with the server's code for the client to judge)
        and a busy or failing server (5xx, 408, 429: dial again later)."""
        if resp.status_code == 401:
            code, message, _ = self._error(resp)
            self._put(_frames.Error(code, message))
            self._lost(CloseInfo(4001, code))
            raise _HttpFailure(code)
        if resp.status_code >= 500 or resp.status_code in _HTTP_RETRY_STATUSES:
            code, message, _ = self._error(resp)
            raise _HttpFailure(f"{code}: {message}")

    async def _hello(self, hello: _frames.Hello) -> None:
        import httpx
        self._token = hello.token
        try:
            resp = await self._http.get(f"{self.base}/v1/stream/", headers=self._headers())
            self._check_link(resp)
        except (httpx.HTTPError, _HttpFailure, OSError) as exc:
            self._lost(CloseInfo(1006, f"HTTP: {exc or type(exc).__name__}"))
            return
        self._client = hello.client or f"http-{secrets.token_hex(6)}"
        if hello.info is not None:
            self._presence = json.dumps(hello.info, separators=(",", ":"))
        self._put(_frames.Welcome(1, self._client, f"{self.mode}-{secrets.token_hex(6)}",
                                  3600.0, 1 << 20))

    async def _content_type(self, session: str) -> str | None:
        """The session's content type (None: it does not exist).  A token
        that may not read it gets application/octet-stream assumed."""
        known = self._types.get(session)
        if known is None:
            resp = await self._http.head(self._url(session), headers=self._headers())
            self._check_link(resp)
            if resp.status_code == 404:
                return None
            known = media_type(resp.headers.get("content-type", "")) \
                if resp.status_code == 200 else "application/octet-stream"
            self._types[session] = known
        return known

    async def _create(self, session: str) -> None:
        """PUT the session as the WebSocket's ``create`` does (a byte
        session); one that exists already (200, or 409 with other settings)
        is fine."""
        resp = await self._http.put(self._url(session), headers=self._headers(
            {"Content-Type": "application/octet-stream"}))
        self._check_link(resp)
        self._types.pop(session, None)

    # ------------------------------------------------------------ reading

    def _params(self, reader: _Reader, offset: int, live: str | None) -> dict[str, str]:
        text = {START: "-1", NOW: "now"}.get(offset) or format_offset(offset)
        params = {"offset": text, "view": "records"}
        if reader.attach.kinds is not None:
            params["kinds"] = ",".join(str(k) for k in reader.attach.kinds)
        if live is not None:
            params["live"] = live
        return params

    @staticmethod
    def _next_of(text: str | None) -> int | None:
        got = parse_offset_text(text or "")
        return got if got is not None and got >= 0 else None

    def _records(self, objs: Any, content_type: str) -> list[Record]:
        out = []
        for obj in objs:
            d = obj["d"]
            if obj.get("b64"):
                payload = base64.b64decode(d)
            elif content_type == "application/json":
                payload = json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode()
            else:
                payload = str(d).encode()
            out.append(Record(int(obj["o"]), int(obj["ts"]), int(obj["k"]), payload,
                              obj.get("p"), obj.get("m")))
        return out

    async def _deliver(self, reader: _Reader, records: list[Record]) -> None:
        """Hand records on as the credit allows; wait for more credit."""
        session = reader.attach.session
        while records:
            if reader.credit is not None:
                while reader.credit <= 0:
                    reader.more = anyio.Event()
                    await reader.more.wait()
                n = min(reader.credit, len(records))
                reader.credit -= n
            else:
                n = len(records)
            chunk, records = records[:n], records[n:]
            self._put(Data(session, tuple(chunk)))

    @staticmethod
    def _epoch_of(resp: Any) -> int:
        """The session epoch an answer speaks of (``Broker-Epoch``)."""
        text = resp.headers.get("broker-epoch", "")
        if not text.isascii() or not text.isdigit():
            raise _HttpFailure(f"no Broker-Epoch in an answer (got {text[:20]!r})")
        return int(text)

    def _end(self, reader: _Reader, frame: _frames.ServerFrame) -> None:
        """End a subscription with ``frame`` (an event, or an error)."""
        if self._readers.get(reader.attach.session) is reader:
            del self._readers[reader.attach.session]
        self._put(frame)

    def _same_epoch(self, reader: _Reader, resp: Any) -> bool:
        """Whether a read answer is of the epoch the reader's offsets belong
        to; if not, the subscription ends with ``epoch_changed``."""
        epoch = self._epoch_of(resp)
        if reader.epoch is None or epoch == reader.epoch:
            return True
        self._end(reader, Event(reader.attach.session, "epoch_changed", epoch))
        return False

    async def _refused(self, reader: _Reader, resp: Any, answering: bool) -> None:
        """A read refused for good: answer the attach, or end the subscription."""
        att = reader.attach
        code, message, retry_after = self._error(resp)
        if code in ("offset_out_of_range", "offset_too_old", "epoch_changed") \
                and reader.epoch is not None:
            # An offset the session does not have, or a session re-created
            # under the read: it is another incarnation only if its epoch
            # says so, else the refusal stands.
            head = await self._http.head(self._url(att.session), headers=self._headers())
            self._check_link(head)
            if head.status_code == 404:
                code = "session_not_found"
            elif head.status_code == 200 and not self._same_epoch(reader, head):
                return
        if code == "session_not_found" and (reader.epoch is not None or not answering):
            self._end(reader, Event(att.session, "deleted"))
        else:
            self._end(reader, _frames.Error(code, message, att.session,
                                            att.id if answering else None, retry_after))

    async def _read(self, reader: _Reader) -> None:
        with reader.scope:
            att = reader.attach
            if att.create:
                await self._create(att.session)
            content_type = await self._content_type(att.session)
            if content_type is None:
                # The session is missing (a 404 from the HEAD); say it as GET would.
                resp = await self._http.get(self._url(att.session), headers=self._headers(),
                                            params=self._params(reader, att.offset, None))
                self._check_link(resp)
                if resp.status_code != 200:
                    await self._refused(reader, resp, True)
                    return
                content_type = await self._content_type(att.session) or "application/octet-stream"
            resp = await self._http.get(self._url(att.session), headers=self._headers(),
                                        params=self._params(reader, att.offset, None))
            self._check_link(resp)
            if resp.status_code != 200:
                await self._refused(reader, resp, True)
                return
            if not self._same_epoch(reader, resp):
                return
            reader.epoch = self._epoch_of(resp)
            records = self._records(resp.json(), content_type)
            nxt = self._next_of(resp.headers.get("stream-next-offset"))
            if nxt is None:
                raise _HttpFailure("no Stream-Next-Offset in a read")
            up = resp.headers.get("stream-up-to-date") == "true"
            closed = resp.headers.get("stream-closed") == "true"
            start = att.offset if att.offset >= 0 else (records[0].offset if records else nxt)
            self._put(Attached(att.id, att.session, reader.epoch, start, nxt, closed and up))
            await self._deliver(reader, records)
            if up:
                self._put(UpToDate(att.session, nxt))
                if closed:
                    self._put(Event(att.session, "closed"))
                    return
            if self.mode == "sse":
                await self._read_sse(reader, content_type, nxt)
            else:
                await self._read_longpoll(reader, content_type, nxt, up)

    async def _read_longpoll(self, reader: _Reader, content_type: str, nxt: int,
                             up: bool) -> None:
        session = reader.attach.session
        while True:
            resp = await self._http.get(
                self._url(session), headers=self._headers(),
                params=self._params(reader, nxt, "long-poll" if up else None))
            self._check_link(resp)
            if resp.status_code not in (200, 204):
                await self._refused(reader, resp, False)
                return
            if not self._same_epoch(reader, resp):
                return
            if resp.status_code == 200:
                await self._deliver(reader, self._records(resp.json(), content_type))
            got = self._next_of(resp.headers.get("stream-next-offset"))
            nxt = got if got is not None else nxt
            up = resp.headers.get("stream-up-to-date") == "true" or resp.status_code == 204
            if up:
                self._put(UpToDate(session, nxt))
                if resp.headers.get("stream-closed") == "true":
                    self._put(Event(session, "closed"))
                    return

    async def _read_sse(self, reader: _Reader, content_type: str, nxt: int) -> None:
        session = reader.attach.session
        while True:
            # A response that ends cleanly (--sse-max-s, the token's expiry)
            # is routine: read on from the last offset.
            async with self._http.stream("GET", self._url(session), headers=self._headers(),
                                         params=self._params(reader, nxt, "sse")) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    self._check_link(resp)
                    await self._refused(reader, resp, False)
                    return
                if not self._same_epoch(reader, resp):
                    return
                event, data = "", []
                async for line in resp.aiter_lines():
                    if line:
                        field, _, value = line.partition(":")
                        value = value[1:] if value.startswith(" ") else value
                        if field == "event":
                            event = value
                        elif field == "data":
                            data.append(value)
                        continue
                    text, kind = "\n".join(data), event
                    event, data = "", []
                    if kind == "data":
                        await self._deliver(reader, self._records(json.loads(text), content_type))
                    elif kind == "control":
                        control = json.loads(text)
                        got = self._next_of(control.get("streamNextOffset"))
                        nxt = got if got is not None else nxt
                        if control.get("upToDate") or control.get("streamClosed"):
                            self._put(UpToDate(session, nxt))
                        if control.get("streamClosed"):
                            self._put(Event(session, "closed"))
                            return

    # ------------------------------------------------------------ presence

    async def _members(self, frame: _frames.Presence) -> None:
        """``presence`` as ``GET ?view=presence``, answered with ``members``.
        (An attach's ``presence`` gets no events over HTTP.)"""
        resp = await self._http.get(self._url(frame.session), headers=self._headers(),
                                    params={"view": "presence"})
        self._check_link(resp)
        if resp.status_code != 200:
            code, message, retry_after = self._error(resp)
            self._put(_frames.Error(code, message, frame.session, frame.id, retry_after))
            return
        try:
            members = tuple(Member(m["id"], m["client"], m["transport"], m["since"],
                                   m.get("info")) for m in resp.json()["members"])
        except (ValueError, KeyError, TypeError) as exc:     # FrameError is a ValueError
            raise _HttpFailure(f"a presence answer that is not one: {exc}") from None
        self._put(_frames.Members(frame.session, members, frame.id))

    # ------------------------------------------------------------ publishing

    async def _post_loop(self, session: str) -> None:
        queue = self._posts[session]
        while queue:
            answer = await self._post(queue[0])
            queue.popleft()
            self._put(answer)
        del self._posts[session]

    async def _post(self, frame: _frames.Publish) -> _frames.ServerFrame:
        session, n = frame.session, len(frame.records)

        def refused(code: str, message: str, retry_after: float | None = None) -> _frames.Error:
            return _frames.Error(code, message, session, frame.id, retry_after)

        content_type = await self._content_type(session)
        if content_type is None:
            if not frame.create:
                return refused("session_not_found", f"session {session!r} does not exist")
            await self._create(session)
            content_type = await self._content_type(session) or "application/octet-stream"
        if content_type == "application/json":
            for p in frame.records:
                try:
                    json.loads(p)
                except ValueError:
                    return refused("bad_payload", "a record of a JSON session must be one "
                                   "JSON value in UTF-8")
            # Wrapped in an array, so that an array value stays one record.
            body = b"[" + b",".join(frame.records) + b"]"
            body_type = content_type
        elif n == 1 and frame.records[0]:
            body, body_type = frame.records[0], content_type       # the plain protocol
        else:
            # Several records, or an empty one: the broker's records body,
            # appended atomically as a WebSocket publish is.
            body = msgpack.packb(list(frame.records), use_bin_type=True)
            body_type = RECORDS_TYPE
        headers = {"Content-Type": body_type}
        if self._client is not None:
            headers["Broker-Client"] = quote(self._client, safe="")
        if frame.producer is not None:
            headers.update({"Producer-Id": frame.producer.id,
                            "Producer-Epoch": str(frame.producer.epoch),
                            "Producer-Seq": str(frame.producer.seq)})
        if frame.kind != 0:
            headers["Broker-Kind"] = "signal" if frame.kind == 1 else str(frame.kind)
        if frame.meta is not None and any(m is not None for m in frame.meta):
            try:
                headers["Broker-Meta"] = json.dumps(list(frame.meta), separators=(",", ":"))
            except (TypeError, ValueError):
                return refused("bad_meta", "over HTTP record meta must be JSON values")
        headers["Content-Length"] = str(len(body))
        request = self._http.build_request("POST", self._url(session),
                                           headers=self._headers(headers))
        request.stream = _body_class()(body)
        resp = await self._http.send(request)
        self._check_link(resp)
        if resp.status_code in (200, 204):
            nxt = self._next_of(resp.headers.get("stream-next-offset"))
            if frame.producer is not None and resp.status_code == 204:
                # A retry of a stored append: where it landed, if the broker knows.
                first = self._next_of(resp.headers.get("broker-first-offset"))
                if first is None or nxt is None or not first < nxt:
                    return Ack(frame.id, session, dup=True)
                return Ack(frame.id, session, first, nxt - first, dup=True)
            if nxt is None:
                raise _HttpFailure("no Stream-Next-Offset after an append")
            return Ack(frame.id, session, nxt - n, n)
        code, message, retry_after = self._error(resp)
        if code == "content_type_mismatch":
            self._types.pop(session, None)
        return refused(code, message, retry_after)


async def dial_http(base: str, mode: str = "sse", *, ssl_context: ssl.SSLContext | None = None,
                    timeout: float = 10.0, read_timeout: float = 75.0) -> HttpTransport:
    """An HTTP transport (``mode`` ``"sse"`` or ``"longpoll"``) on the broker
    at ``base`` (``http(s)://host:port``).  Nothing is sent until ``hello``.
    ``read_timeout`` is how long a read may hear nothing (the server sends
    SSE keep-alives and long-poll answers every 30 s by default)."""
    import httpx
    if mode not in ("sse", "longpoll"):
        raise ValueError(f"mode must be sse or longpoll, not {mode!r}")
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _DialError("bad_url", f"not an http:// or https:// URL: {base[:100]!r}", True)
    http = httpx.AsyncClient(
        verify=ssl_context if ssl_context is not None else True,
        timeout=httpx.Timeout(timeout, read=read_timeout),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=20))
    return HttpTransport(base.rstrip("/"), mode, http, read_timeout)


async def _dial_http_for(base: str, mode: str, ssl_context: ssl.SSLContext | None,
                         timeout: float, read_timeout: float, url: str) -> HttpTransport:
    return await dial_http(base, mode, ssl_context=ssl_context, timeout=timeout,
                           read_timeout=read_timeout)


async def _http_answers(base: str, ssl_context: ssl.SSLContext | None, timeout: float) -> bool:
    """Does the broker at ``base`` answer a plain HTTP request (any status)?"""
    import httpx
    try:
        async with httpx.AsyncClient(verify=ssl_context if ssl_context is not None else True,
                                     timeout=timeout) as http:
            await http.get(f"{base}/v1/stream/")
    except (httpx.HTTPError, OSError):
        return False
    return True


# ================================================================ one connection

Answer = Callable[[_frames.Frame | ClientError], None]
"""Called once with the answer to a request, or with why the connection ended."""


class Connection:
    """One connection's protocol, over a transport: no reconnect, no retry.

    Requests are answered by id (``request`` awaits the answer, raising
    ClientError for an ``error``; ``send_request`` takes a callback instead,
    for pipelining).  Frames about an attached session (``data``,
    ``up_to_date``, ``event``, and ``error`` without an id) go to that
    session's *route*, a callback.  ``run`` reads until the connection ends;
    then every pending answer and route is called once with the ClientError
    that says why: the connection-level ``error`` the server sent before a
    4xxx close (``token_expired``, ...), else ``ConnectionLost``."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.welcome: _frames.Welcome | None = None
        self.closed: CloseInfo | None = None      # set when the connection has ended
        # The latest error about the whole connection (no id, no session).
        self.error: ClientError | None = None
        # Set when the server warns that the token expires soon; a fresh Event
        # after each refresh.  ``expiring_ttl`` is the seconds it gave.
        self.expiring = anyio.Event()
        self.expiring_ttl: float | None = None
        self._ids = itertools.count(1)
        self._answers: dict[int, Answer] = {}
        self._attaching: dict[str, int] = {}       # session -> id of its attach in flight
        self._routes: dict[str, Answer] = {}
        self._gone: ClientError | None = None
        self._done = anyio.Event()

    # ------------------------------------------------------------ sending

    def next_id(self) -> int:
        return next(self._ids)

    async def send(self, frame: _frames.ClientFrame) -> None:
        """Send any frame as it is (no answer awaited).  Raises the reason the
        connection ended if it has."""
        if self._gone is not None:
            raise self._gone.with_traceback(None)
        try:
            await self.transport.send(frame)
        except TransportClosed as exc:
            raise ConnectionLost(exc.close) from None

    async def send_request(self, frame: Any, on_answer: Answer,
                           route: Answer | None = None) -> None:
        """Send a request with an ``id``; ``on_answer`` gets its answer.  For an
        ``attach``, ``route`` is the session's route from now on (an ``event``
        that answers the attach instead of ``attached`` goes to ``on_answer``).

        Raises why the connection ended if it already has.  (Answering
        ``on_answer`` at once instead would let a caller that sends again
        from its callback spin without ever reaching a checkpoint.)  If it
        ends during the send, ``run`` answers ``on_answer``."""
        if self._gone is not None:
            raise self._gone.with_traceback(None)
        self._answers[frame.id] = on_answer
        if isinstance(frame, _frames.Attach):
            self._attaching[frame.session] = frame.id
            if route is not None:
                self._routes[frame.session] = route
        try:
            await self.transport.send(frame)
        except TransportClosed:
            pass           # ``run`` sees the end and answers every waiter

    async def request(self, frame: Any, route: Answer | None = None) -> _frames.Frame:
        """Send a request and wait for its answer; ClientError for an error."""
        done = anyio.Event()
        box: list[_frames.Frame | ClientError] = []

        def answer(a: _frames.Frame | ClientError) -> None:
            box.append(a)
            done.set()

        try:
            await self.send_request(frame, answer, route)
            await done.wait()
        finally:
            if not box:                # cancelled: nobody waits for the answer now
                self._answers.pop(frame.id, None)
        got = box[0]
        if isinstance(got, ClientError):
            raise got.with_traceback(None)
        if isinstance(got, _frames.Error):
            raise _client_error(got)
        return got

    def has_route(self, session: str) -> bool:
        return session in self._routes

    # ------------------------------------------------------------ the protocol

    async def hello(self, frame: _frames.Hello, timeout: float = 10.0) -> _frames.Welcome:
        """Say hello and read up to the welcome.  Raises the refusal
        (``unauthorized``, ``token_invalid``, ...) or ConnectionLost."""
        await self.send(frame)
        try:
            with anyio.fail_after(timeout):
                while self.welcome is None:
                    got = await self.transport.receive()
                    if isinstance(got, _frames.Welcome):
                        self.welcome = got
                    else:
                        await self._dispatch(got)
        except TransportClosed as exc:
            self._finish(exc.close)
            assert self._gone is not None
            raise self._gone.with_traceback(None) from None
        except TimeoutError:
            self._finish(CloseInfo(1006, f"no welcome within {timeout:g} s"))
            assert self._gone is not None
            raise self._gone.with_traceback(None) from None
        return self.welcome

    async def run(self) -> None:
        """Read and dispatch until the connection ends; never raises.  Hearing
        nothing for two heartbeat intervals ends it (the server pings every
        ``welcome.heartbeat`` seconds, so the link is dead)."""
        idle = 2 * self.welcome.heartbeat if self.welcome is not None else math.inf
        close = CloseInfo(1006, "the connection ended")
        try:
            while True:
                with anyio.move_on_after(idle) as quiet:
                    frame = await self.transport.receive()
                if quiet.cancelled_caught:
                    close = CloseInfo(1006, f"nothing from the server for {idle:g} s")
                    await self.transport.aclose()
                    break
                await self._dispatch(frame)
        except TransportClosed as exc:
            close = exc.close
        finally:
            self._finish(close)

    async def wait_closed(self) -> None:
        await self._done.wait()

    async def close(self, code: int = 1000, timeout: float = 2.0) -> None:
        """Close politely: send a close frame and give ``run`` up to
        ``timeout`` seconds to see the server's answer; then drop the link."""
        with anyio.CancelScope(shield=True):
            await self.transport.close(code)
            with anyio.move_on_after(timeout):
                await self._done.wait()
            await self.transport.aclose()

    async def _dispatch(self, frame: _frames.Frame) -> None:
        if isinstance(frame, _frames.Ping):
            try:
                await self.send(_frames.Pong(frame.id))
            except ClientError:
                pass        # the end shows up in ``run``
            return
        if isinstance(frame, _frames.Expiring):
            self.expiring_ttl = frame.ttl
            self.expiring.set()
            return
        session = getattr(frame, "session", None)
        request_id = getattr(frame, "id", None)
        if isinstance(frame, _frames.Error) and request_id is None and session is None:
            self.error = _client_error(frame)     # the server closes after most of these
            return
        if isinstance(frame, Event) and session in self._attaching:
            # An attach answered with an event instead of ``attached``.
            request_id = self._attaching.pop(session)
            self._routes.pop(session, None)
        elif request_id is not None and not isinstance(frame, _frames.Pong):
            if isinstance(frame, (Attached, _frames.Error)) \
                    and self._attaching.get(session or "") == request_id:
                del self._attaching[session or ""]
                if isinstance(frame, _frames.Error):
                    self._routes.pop(session or "", None)
            elif isinstance(frame, _frames.Detached) or (
                    isinstance(frame, _frames.Error) and frame.code == "not_attached"):
                self._routes.pop(session or "", None)
        else:
            request_id = None
        if request_id is not None:
            answer = self._answers.pop(request_id, None)
            if answer is not None:
                answer(frame)
            return
        if session is not None:
            route = self._routes.get(session)
            if route is not None:
                if isinstance(frame, (Event, _frames.Error)):
                    del self._routes[session]      # the server ended the subscription
                route(frame)

    def _finish(self, close: CloseInfo) -> None:
        if self._gone is not None:
            return
        self.closed = close
        if self.error is not None and (4000 <= close.code < 5000 or self.welcome is None):
            self._gone = self.error
        else:
            self._gone = ConnectionLost(close)
        answers, self._answers = self._answers, {}
        routes, self._routes = self._routes, {}
        self._attaching.clear()
        for answer in answers.values():
            answer(self._gone)
        for route in routes.values():
            route(self._gone)
        self._done.set()

    # ------------------------------------------------------------ requests

    async def refresh(self, token: str) -> _frames.Refreshed:
        """Replace the connection's token with a fresh one for the same sub;
        its capabilities apply at once.  Raises ClientError if it is refused
        (``client_mismatch`` also closes the connection)."""
        answer = await self.request(_frames.Refresh(self.next_id(), token))
        assert isinstance(answer, _frames.Refreshed)
        self.expiring = anyio.Event()
        self.expiring_ttl = None
        return answer

    async def publish(self, session: str, payloads: Sequence[bytes], *, kind: int = 0,
                      meta: Sequence[Any] | None = None,
                      producer: tuple[str, int, int] | None = None,
                      create: bool = False) -> Ack:
        """Append records and wait until they are durable; returns the ack."""
        answer = await self.request(_frames.Publish(
            self.next_id(), session, tuple(payloads), kind,
            None if meta is None else tuple(meta),
            None if producer is None else _frames.Producer(*producer), create))
        assert isinstance(answer, Ack)
        return answer

    async def signal(self, session: str, payload: bytes, meta: Any = None) -> Ack:
        answer = await self.request(_frames.Signal(self.next_id(), session, payload, meta))
        assert isinstance(answer, Ack)
        return answer

    async def attach(self, session: str, offset: int | str = "now", *,
                     epoch: int | None = None, kinds: Sequence[int] | None = None,
                     credit: int | None = None, create: bool = False,
                     view: bool = False, presence: bool = False, hidden: bool = False,
                     info: Mapping[str, Any] | None = None) -> Attachment:
        """Attach from ``offset`` (an int, "-1", "now" or an HTTP offset).

        With ``view`` (leave ``offset`` out), the first frame of the
        attachment (``next_frame``) is a ``view``: the conversation so far,
        exact at its ``next``, where the records then go on (docs/ai.md,
        "Views").  With ``presence``, ``next_frame`` also gives the session's
        ``members``, then ``join`` and ``leave`` frames; ``hidden`` attaches
        without being shown, and ``info`` is what this attach shows instead
        of hello's (docs/protocol.md, "Presence").  Raises SessionEnded if
        the session is gone or its epoch is not ``epoch``, and ClientError
        for other refusals."""
        if session in self._routes:
            raise ClientError("already_attached", f"already attached to {session!r}", session)
        frame = _frames.Attach(self.next_id(), session, _frames.parse_offset(offset), epoch,
                               None if kinds is None else tuple(kinds), credit, create,
                               view=view, presence=presence, hidden=hidden,
                               info=None if info is None else dict(info))
        att = Attachment(self, session)
        answer = await self.request(frame, route=att._deliver)
        if isinstance(answer, Event):
            raise _ended(session, answer, epoch)
        assert isinstance(answer, Attached)
        att.epoch, att.offset = answer.epoch, answer.offset
        return att

    async def detach(self, session: str) -> None:
        await self.request(_frames.Detach(self.next_id(), session))

    async def presence(self, session: str) -> list[Member]:
        """Who is attached to ``session`` now (needs ``read``)."""
        answer = await self.request(_frames.Presence(self.next_id(), session))
        assert isinstance(answer, _frames.Members)
        return list(answer.members)


class Attachment:
    """A session attached on one Connection.  Iterate it for records, or take
    its frames one at a time with ``next_frame``; ``offset`` is where a resume
    would start (after the last record returned, or the last up_to_date)."""

    def __init__(self, conn: Connection, session: str) -> None:
        self.connection = conn
        self.session = session
        self.epoch: int | None = None
        self.offset = 0
        self.up_to_date = False
        self.ended: ClientError | None = None
        self._frames: deque[_frames.Frame | ClientError] = deque()
        self._wake = anyio.Event()
        self._records: deque[Record] = deque()     # of the data frame being iterated

    def _deliver(self, frame: _frames.Frame | ClientError) -> None:
        self._frames.append(frame)
        self._wake.set()

    async def _next(self) -> _frames.Frame:
        while not self._frames:
            self._wake = anyio.Event()
            await self._wake.wait()
        got = self._frames.popleft()
        if isinstance(got, ClientError):
            self._frames.appendleft(got)           # and again on every later call
            self.ended = got
            raise got.with_traceback(None)
        return got

    async def next_frame(self) -> _frames.Frame:
        """The next data, up_to_date, event or error frame for this session
        (a lower level than iterating; use one or the other)."""
        frame = await self._next()
        if isinstance(frame, Data):
            self.offset = frame.records[-1].offset + 1
        elif isinstance(frame, UpToDate):
            self.offset = frame.next
            self.up_to_date = True
        return frame

    def __aiter__(self) -> Attachment:
        return self

    async def __anext__(self) -> Record:
        """The next record.  Ends at a ``closed`` event; raises SessionEnded for
        the other events and ClientError for an error.  ``offset`` moves past a
        record only once it is returned."""
        while not self._records:
            frame = await self._next()
            if isinstance(frame, Data):
                self._records.extend(frame.records)
            elif isinstance(frame, UpToDate):
                self.offset = frame.next
                self.up_to_date = True
            elif isinstance(frame, Event):
                self.ended = _ended(self.session, frame, self.epoch)
                if frame.event == "closed":
                    raise StopAsyncIteration
                raise self.ended
            elif isinstance(frame, _frames.Error):
                self.ended = _client_error(frame)
                raise self.ended
        record = self._records.popleft()
        self.offset = record.offset + 1
        return record

    async def credit(self, n: int) -> None:
        await self.connection.send(_frames.Credit(self.session, n))

    async def detach(self) -> None:
        await self.connection.detach(self.session)


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception in a (nested) group, or None if there are several."""
    leaves: list[BaseException] = []
    todo: list[BaseException] = [group]
    while todo:
        exc = todo.pop()
        if isinstance(exc, BaseExceptionGroup):
            todo.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else None


@asynccontextmanager
async def open_connection(url: str, *, client_id: str | None = None, token: str | None = None,
                          ssl_context: ssl.SSLContext | None = None,
                          timeout: float = 10.0,
                          presence_info: Mapping[str, Any] | None = None,
                          ) -> AsyncIterator[Connection]:
    """Open one connection, say hello, and yield it; it is closed (politely)
    on the way out.  Raises ClientError if the hello is refused
    (``unauthorized``, ``token_invalid``, ``token_expired``,
    ``client_mismatch``) or the dial fails.  No reconnect: for that, use
    ``connect``.  ``presence_info`` is what the connection shows in the
    presence of the sessions it attaches."""
    hello = _frames.Hello(client_id, token,
                          None if presence_info is None else dict(presence_info))
    transport = await dial_websocket(url, ssl_context=ssl_context, timeout=timeout)
    conn = Connection(transport)
    try:
        await conn.hello(hello, timeout)
    except BaseException:
        await transport.aclose()
        raise
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(conn.run)
            try:
                yield conn
            finally:
                await conn.close()
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        exc = _unwrap(group)
        if exc is None:
            raise
        raise exc from exc.__cause__


# ================================================================ the reconnecting client

# Publish and signal refusals that pass if sent again (the same stamp, so
# safely); anything else is the caller's to see.
_RETRY_CODES: Final = frozenset({"rate_limited", "unavailable", "storage_error"})
# Connection-level refusals that no retry can fix.
_FATAL_CODES: Final = frozenset({"unauthorized", "token_invalid", "client_mismatch",
                                 "hello_required", "bad_url", "bad_handshake",
                                 "bad_subprotocol", "tls_failed"})
# Close codes that say the client itself is broken: sending again would repeat it.
_FATAL_CLOSES: Final = frozenset({1002, 1003, 1007, 1009, 1010, 4000})

TokenSource = str | Callable[[], str | Awaitable[str]] | None


class Client:
    """A logical connection that outlives real ones (see the module's theory
    of operation).  Made by ``connect``; use ``session(name)`` for the rest.

    ``state`` is CONNECTING, CONNECTED, RECONNECTING or CLOSED; ``error`` is
    why it closed on its own (None while it runs, or when closed by its
    owner); ``connects`` counts the connections that got a welcome."""

    def __init__(self, url: str, *, token: TokenSource = None, client_id: str | None = None,
                 dial: Dial | Sequence[tuple[str, Dial]], backoff: Backoff,
                 connect_timeout: float, window: int, max_retry_wait: float,
                 rng: random.Random | None,
                 http_answers: Callable[[], Awaitable[bool]] | None = None,
                 presence_info: Mapping[str, Any] | None = None) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.url = url
        self.client_id = client_id
        # What this client shows in presence, sent in every hello.
        self.presence_info = None if presence_info is None else dict(presence_info)
        if self.presence_info is not None and (
                problem := _frames.info_problem(self.presence_info)) is not None:
            raise ValueError(f"presence_info {problem}")
        self.backoff = backoff
        self.window = window
        self.max_retry_wait = max_retry_wait
        self.state = State.CONNECTING
        self.error: ClientError | None = None
        self.connection: Connection | None = None
        self.welcome: _frames.Welcome | None = None
        self.connects = 0
        self.producer_id = f"{client_id or 'client'}/{secrets.token_hex(8)}"
        self._token = token
        # The transports to try, best first: (name, dialer).  ``_using`` is
        # the one in use; it only moves down the list (see ``_supervise``).
        self._dials = [("custom", dial)] if callable(dial) else list(dial)
        if not self._dials:
            raise ValueError("no transport to use")
        self._using = 0
        self._open_failures = 0          # dials or hellos of it that failed in a row
        self._http_answers = http_answers
        self._connect_timeout = connect_timeout
        self._rng = rng or random.Random()
        self._state_changed = anyio.Event()
        self._wake = anyio.Event()
        self._subs: dict[str, Subscription[Any]] = {}
        self._pipes: dict[str, _Pipeline] = {}
        self._json: dict[str, bool] = {}             # session -> is it a JSON session?
        self._ssl_context: ssl.SSLContext | None = None    # for HTTP requests beside a transport
        self._tg: anyio.abc.TaskGroup | None = None

    # ------------------------------------------------------------ public

    @property
    def transport(self) -> str:
        """The transport in use (or being tried): ``"ws"``, ``"sse"``,
        ``"longpoll"``, or ``"custom"`` for a ``dial`` given to connect."""
        return self._dials[self._using][0]

    def session(self, name: str, *, json: bool | None = None) -> Session:
        """A handle on session ``name`` (cheap; nothing is sent).  ``json``
        says whether it is a JSON session (see Session.is_json); left out,
        the client asks the broker when it first needs to know."""
        if type(name) is not str or not name:
            raise ValueError("a session name is a non-empty string")
        if json is not None:
            self._json[name] = bool(json)
        return Session(self, name)

    async def wait_for(self, *states: State) -> State:
        """Wait until the state is one of ``states``; returns it."""
        while self.state not in states:
            await self._state_changed.wait()
        return self.state

    async def aclose(self) -> None:
        """Close: pending calls raise ClientClosed, subscriptions end."""
        if self.state is not State.CLOSED:
            self._close(ClientClosed(), by_owner=True)
        conn = self.connection
        if conn is not None:
            await conn.close()

    # ------------------------------------------------------------ state

    def _set_state(self, state: State) -> None:
        if state is not self.state:
            self.state = state
            event, self._state_changed = self._state_changed, anyio.Event()
            event.set()

    def _closed(self) -> bool:
        return self.state is State.CLOSED

    def _poke(self) -> None:
        self._wake.set()

    def _check_open(self) -> None:
        if self.state is State.CLOSED:
            raise (self.error or ClientClosed()).with_traceback(None)

    def _close(self, error: ClientError, by_owner: bool = False) -> None:
        """Close for good: every waiting call and subscription gets ``error``."""
        if not by_owner:
            self.error = error
            logger.warning("broker client %s closed: %s", self.url, error)
        self._set_state(State.CLOSED)
        for sub in list(self._subs.values()):
            sub._fail(error)
        for pipe in self._pipes.values():
            pipe.fail_all(error)
        self._poke()

    async def _token_now(self) -> str | None:
        source = self._token
        if source is None or isinstance(source, str):
            return source
        got = source()
        if not isinstance(got, str):
            got = await got
        return got

    # ------------------------------------------------------------ supervisor

    async def _supervise(self) -> None:
        attempt = 0
        down_since = anyio.current_time()
        while self.state is not State.CLOSED:
            failure = await self._connect_once()
            now = anyio.current_time()
            if failure.up_for is not None:
                down_since = now
                if failure.up_for >= self.backoff.maximum:
                    attempt = 0
            if self._closed():
                return
            error = failure.error
            if failure.up_for is not None:
                self._open_failures = 0
            elif self._using + 1 < len(self._dials) and self._transport_failed(error):
                # A transport that fails to open twice in a row, while the
                # broker answers plain HTTP, is given up for the next one (a
                # proxy that refuses WebSocket upgrades).  If HTTP gets no
                # answer either, the broker itself is down: keep the
                # transport, so a restart does not push the client down.
                self._open_failures += 1
                if self._open_failures >= 2 and self._http_answers is not None \
                        and await self._http_answers():
                    logger.warning("broker client %s: %s failed to open twice (%s); "
                                   "falling back to %s", self.url, self.transport, error,
                                   self._dials[self._using + 1][0])
                    self._using += 1
                    self._open_failures = 0
                    attempt = 0
                    continue
                if self._open_failures >= 2:
                    self._open_failures = 0     # the broker's fault, not the transport's
                elif self._fatal(error):
                    error = _DialError(error.code, error.message, False)   # try it once more
            if self._fatal(error):
                self._close(error)
                return
            give_up = self.backoff.give_up_after
            if give_up is not None and now - down_since >= give_up:
                self._close(ConnectionLost(
                    CloseInfo(1006, "gave up"),
                    f"no connection for {now - down_since:.3g} s, the last attempt: {error}"))
                return
            self._set_state(State.RECONNECTING if self.connects else State.CONNECTING)
            delay = self.backoff.delay(attempt, self._rng)
            logger.info("broker client %s: %s; reconnecting in %.3g s", self.url, error, delay)
            attempt += 1
            await anyio.sleep(delay)

    def _transport_failed(self, error: ClientError) -> bool:
        """Could another transport do better than the one that gave ``error``?
        Not for a refused token or a bad URL: every transport would get those."""
        if isinstance(error, _DialError):
            return error.code not in ("bad_url", "tls_failed")
        return not self._fatal(error)

    def _fatal(self, error: ClientError) -> bool:
        if isinstance(error, _DialError):
            return error.permanent
        if error.code == "token_expired":
            # A provider gives a fresh token next time; a fixed token stays expired.
            return not callable(self._token)
        if isinstance(error, ConnectionLost):
            return error.close.code in _FATAL_CLOSES
        return error.code in _FATAL_CODES

    async def _connect_once(self) -> _Outcome:
        try:
            token = await self._token_now()
        except Exception as exc:
            logger.exception("broker client: the token provider failed")
            return _Outcome(ClientError("token_unavailable", f"the token provider failed: {exc}"))
        try:
            transport = await self._dials[self._using][1](self.url)
        except ClientError as exc:
            return _Outcome(exc)
        except (OSError, TimeoutError, anyio.BrokenResourceError) as exc:
            return _Outcome(ClientError("connect_failed", str(exc) or type(exc).__name__))
        conn = Connection(transport)
        try:
            await conn.hello(_frames.Hello(self.client_id, token, self.presence_info),
                             self._connect_timeout)
        except ClientError as exc:
            await transport.aclose()
            return _Outcome(exc)
        except BaseException:
            await transport.aclose()
            raise
        up_at = anyio.current_time()
        self.connection, self.welcome = conn, conn.welcome
        if self.client_id is None and conn.welcome is not None:
            # Keep the name the server gave: producer state is kept per
            # publisher, and an unnamed client would be a new one (a new
            # ``anon-`` id) on every connection, so its resends could not
            # be recognised.
            self.client_id = conn.welcome.client
        self.connects += 1
        self._set_state(State.CONNECTED)
        try:
            async with anyio.create_task_group() as tg:
                serve = getattr(transport, "serve", None)
                if serve is not None:
                    tg.start_soon(serve)         # an HTTP transport's requests
                tg.start_soon(self._pump, conn)
                tg.start_soon(self._refresher, conn)
                await conn.run()
                tg.cancel_scope.cancel()
        finally:
            self.connection = None
            with anyio.CancelScope(shield=True):
                await transport.aclose()
        assert conn._gone is not None
        return _Outcome(conn._gone, anyio.current_time() - up_at)

    async def _refresher(self, conn: Connection) -> None:
        """With a token provider, answer the server's ``expiring`` with a
        ``refresh``; if that fails, the connection ends at expiry and the next
        one says hello with a fresh token."""
        if not callable(self._token):
            return
        while True:
            await conn.expiring.wait()
            try:
                token = await self._token_now()
                if token is not None:
                    await conn.refresh(token)
                    continue
            except ClientError as exc:
                logger.warning("broker client: refresh refused: %s", exc)
            except Exception:
                logger.exception("broker client: the token provider failed")
            return

    # ------------------------------------------------------------ the pump

    async def _pump(self, conn: Connection) -> None:
        """Every send on ``conn``: attaches, credit and batches, in rounds;
        it sleeps until poked or until a paused retry is due."""
        try:
            while True:
                self._wake = anyio.Event()
                due = await self._service(conn)
                with anyio.move_on_at(due):
                    await self._wake.wait()
        except ClientError:
            await conn.transport.aclose()     # a failed send: make sure ``run`` ends too

    async def _service(self, conn: Connection) -> float:
        now = anyio.current_time()
        due = math.inf
        for sub in list(self._subs.values()):
            due = min(due, await sub._service(conn, now))
        for pipe in list(self._pipes.values()):
            due = min(due, await pipe.service(conn, now))
        return due

    def _pipe(self, session: str) -> _Pipeline:
        pipe = self._pipes.get(session)
        if pipe is None:
            pipe = self._pipes[session] = _Pipeline(self, session)
        return pipe


@dataclass(frozen=True, slots=True)
class _Outcome:
    error: ClientError              # why the connection ended, or why there was none
    up_for: float | None = None     # seconds it was up, if it got a welcome


def _retry_delay(client: Client, error: _frames.Error, failures: int) -> float | None:
    """Seconds to wait before sending a refused request again, or None if it
    must not be (the refusal is final, or the server asks for too long)."""
    if error.code not in _RETRY_CODES:
        return None
    if error.retry_after is not None:
        return error.retry_after if error.retry_after <= client.max_retry_wait else None
    return client.backoff.delay(failures, client._rng)


# ---------------------------------------------------------------- publishing

class _Entry:
    """One publish call (or one part of a streamed message), until it settles."""

    __slots__ = ("payloads", "meta", "kind", "create", "nbytes", "result", "error", "done")

    def __init__(self, payloads: tuple[bytes, ...], meta: tuple[Any, ...] | None, kind: int,
                 create: bool) -> None:
        self.payloads = payloads
        self.meta = meta
        self.kind = kind
        self.create = create
        # What the records take in a frame (msgpack adds at most 5 bytes each).
        self.nbytes = sum(len(p) + 5 for p in payloads) + (
            len(msgpack.packb(list(meta), use_bin_type=True)) if meta is not None else 0)
        self.result: range | None = None
        self.error: ClientError | None = None
        self.done = anyio.Event()

    def resolve(self, result: range | None) -> None:
        if not self.done.is_set():
            self.result = result
            self.done.set()

    def fail(self, error: ClientError) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()

    async def wait(self) -> range | None:
        await self.done.wait()
        if self.error is not None:
            raise self.error.with_traceback(None)
        return self.result


class _Batch:
    """Entries sent as one ``publish`` frame under one stamp.  Its records
    never change once stamped; ``restamp`` marks a batch that must take a new
    stamp (of a new producer epoch) before it is sent again."""

    __slots__ = ("entries", "epoch", "seq", "conn", "request_id", "restamp")

    def __init__(self, entries: list[_Entry], epoch: int, seq: int) -> None:
        self.entries = entries
        self.epoch = epoch
        self.seq = seq
        self.conn: Connection | None = None      # the connection it was last sent on
        self.request_id = -1                     # of that send; other answers are stale
        self.restamp = False

    def frame(self, request_id: int, session: str, producer: str) -> _frames.Publish:
        first = self.entries[0]
        payloads = tuple(p for e in self.entries for p in e.payloads)
        meta = None
        if any(e.meta is not None for e in self.entries):
            meta = tuple(m for e in self.entries
                         for m in (e.meta if e.meta is not None else (None,) * len(e.payloads)))
        return _frames.Publish(request_id, session, payloads, first.kind, meta,
                               _frames.Producer(producer, self.epoch, self.seq), first.create)


class _Pipeline:
    """A session's publishes: calls waiting to be sent (``queue``) and
    batches sent and not yet acknowledged (``batches``, in seq order).

    The producer rules (docs/protocol.md) make a resend safe only if it is
    the same records under the same stamp, so:

    * after a cut, every unacknowledged batch is sent again as it was;
    * a refusal that may pass (``rate_limited``, ``unavailable``,
      ``storage_error``) pauses the pipeline and sends the refused batch and
      every later one again (the later ones were refused as a sequence gap);
    * any other refusal fails that batch's calls; the producer moves to a new
      epoch, and the later batches are stamped again in it.  They wait until
      every batch of the old epoch has settled: a batch of the old epoch sent
      again after the new epoch was accepted would be refused as stale even
      if it had been stored;
    * ``batch_too_large`` for a batch of several calls (merging outgrew the
      connection's publish burst) splits it into one batch per call, stamped
      again in place, and halves how much is merged from then on;
    * ``stale_producer_epoch`` (someone else uses this producer id) fails
      everything.
    """

    MAX_IN_FLIGHT: Final = 64             # batches on the wire per session
    MAX_BATCH_RECORDS: Final = 1000       # merged into one frame at most
    MAX_BATCH_BYTES: Final = 256 << 10
    MAX_QUEUED_BYTES: Final = 4 << 20     # submit waits beyond this

    def __init__(self, client: Client, session: str) -> None:
        self.client = client
        self.session = session
        self.producer = client.producer_id
        self.epoch = 0
        self.next_seq = 0
        self.queue: deque[_Entry] = deque()
        self.queued_bytes = 0
        self.batches: deque[_Batch] = deque()
        self.paused_until = -math.inf
        self.failures = 0                     # retriable refusals in a row
        self.merge_records = self.MAX_BATCH_RECORDS   # halved by each batch_too_large
        self._room = anyio.Event()

    # ------------------------------------------------------------ callers

    async def submit(self, entry: _Entry) -> None:
        await self.wait_for_room()
        self.enqueue(entry)

    async def wait_for_room(self) -> None:
        """Wait while the queue holds more than MAX_QUEUED_BYTES (the
        publisher outruns the link)."""
        self.client._check_open()
        while self.queued_bytes > self.MAX_QUEUED_BYTES:
            if self._room.is_set():        # waiters share one event until it is set
                self._room = anyio.Event()
            await self._room.wait()
            self.client._check_open()

    def enqueue(self, entry: _Entry) -> None:
        self.client._check_open()
        limit = self._frame_limit()
        if entry.nbytes > limit:
            raise ClientError("message_too_large", f"{entry.nbytes} bytes of records do not fit "
                              f"in one message of at most {limit} bytes: split them",
                              self.session)
        self.queue.append(entry)
        self.queued_bytes += entry.nbytes
        self.client._poke()

    def _frame_limit(self) -> int:
        welcome = self.client.welcome
        max_message = welcome.max_message if welcome is not None else 1 << 20
        return max_message - 200 - len(self.session.encode()) - len(self.producer.encode())

    def fail_all(self, error: ClientError) -> None:
        for batch in self.batches:
            for entry in batch.entries:
                entry.fail(error)
        for entry in self.queue:
            entry.fail(error)
        self.batches.clear()
        self.queue.clear()
        self.queued_bytes = 0
        self._room.set()

    # ------------------------------------------------------------ the pump's side

    async def service(self, conn: Connection, now: float) -> float:
        """Send what is due on ``conn``; returns when to look again."""
        # Answers arrive during each send and may pause, rewind or fence the
        # pipeline, so every step looks at its state afresh.
        while True:
            if anyio.current_time() < self.paused_until:
                return self.paused_until
            batch = next((b for b in self.batches if b.restamp or b.conn is not conn), None)
            if batch is None:
                break
            if batch.restamp:
                if self._fenced():
                    return math.inf
                for later in self.batches:
                    if later.restamp:
                        later.epoch, later.seq, later.restamp = self.epoch, self.next_seq, False
                        self.next_seq += 1
                continue
            await self._send(batch, conn)
        while self.queue and len(self.batches) < self.MAX_IN_FLIGHT and not self._fenced():
            if anyio.current_time() < self.paused_until:
                return self.paused_until
            batch = self._form()
            self.batches.append(batch)
            await self._send(batch, conn)
        return math.inf

    def _fenced(self) -> bool:
        """Batches of an older epoch are unsettled: the new epoch must wait."""
        return any(b.epoch < self.epoch and not b.restamp for b in self.batches)

    def _form(self) -> _Batch:
        first = self.queue.popleft()
        entries, records, size = [first], len(first.payloads), first.nbytes
        limit = min(self.MAX_BATCH_BYTES, self._frame_limit())
        while self.queue:
            e = self.queue[0]
            if (e.kind != first.kind or e.create != first.create
                    or records + len(e.payloads) > self.merge_records
                    or size + e.nbytes > limit):
                break
            entries.append(self.queue.popleft())
            records += len(e.payloads)
            size += e.nbytes
        self.queued_bytes -= size
        self._room.set()
        batch = _Batch(entries, self.epoch, self.next_seq)
        self.next_seq += 1
        return batch

    async def _send(self, batch: _Batch, conn: Connection) -> None:
        request_id = conn.next_id()
        batch.conn, batch.request_id = conn, request_id
        await conn.send_request(
            batch.frame(request_id, self.session, self.producer),
            lambda answer: self._answer(batch, request_id, answer))

    def _answer(self, batch: _Batch, request_id: int, answer: _frames.Frame | ClientError) -> None:
        if batch.request_id != request_id or batch not in self.batches:
            return                           # an answer to an earlier send of it
        if isinstance(answer, ClientError):
            batch.conn = None                # the connection ended: send it again on the next
            return
        if isinstance(answer, Ack):
            self.batches.remove(batch)
            self.failures = 0
            offset = answer.offset
            if answer.dup and answer.count != sum(len(e.payloads) for e in batch.entries):
                offset = None                # a dup whose original the broker cannot place
            for entry in batch.entries:
                if offset is None:           # dup: stored before, offsets not known here
                    entry.resolve(None)
                else:
                    entry.resolve(range(offset, offset + len(entry.payloads)))
                    offset += len(entry.payloads)
            self.client._poke()
            return
        assert isinstance(answer, _frames.Error)
        delay = _retry_delay(self.client, answer, self.failures)
        if delay is not None:
            self.failures += 1
            self.paused_until = anyio.current_time() + delay
            at = self.batches.index(batch)
            for later in itertools.islice(self.batches, at, None):
                # Their answers still on the way (sequence gaps) are now stale.
                later.conn, later.request_id = None, -1
            self.client._poke()
            return
        error = _client_error(answer)
        if answer.code == "stale_producer_epoch":
            self.fail_all(error)
            return
        at = self.batches.index(batch)
        del self.batches[at]
        if answer.code == "batch_too_large" and len(batch.entries) > 1:
            self.merge_records = max(1, self.merge_records // 2)
            for entry in reversed(batch.entries):
                single = _Batch([entry], batch.epoch, batch.seq)
                single.restamp = True
                self.batches.insert(at, single)
        else:
            for entry in batch.entries:
                entry.fail(error)
        at_fault = batch.epoch
        self.epoch = max(self.epoch, at_fault + 1)
        self.next_seq = 0
        for later in itertools.islice(self.batches, at, None):
            if later.epoch == at_fault:
                later.restamp, later.conn, later.request_id = True, None, -1
        self.client._poke()


# ---------------------------------------------------------------- subscriptions

class Subscription(Generic[T]):
    """Records of one session from an offset on, across reconnects.

    Iterate it (``async for``); use it as an async context manager, or call
    ``aclose``, to end it.  ``cursor`` is the offset after the last record
    yielded (or past the records a ``kinds`` filter skipped, once caught up),
    with the epoch: save it, and pass it to a later ``subscribe`` to go on
    from there.  Iteration ends when the session is closed and read to its
    end, and raises EpochChanged, SessionDeleted, or ClientError for a
    refusal (``forbidden``, ``offset_too_old``, ...) or a closed client.

    A client holds one subscription per session at a time: subscribing again
    to a session closes the previous subscription unless it is being iterated
    right now (then ``already_subscribed``)."""

    def __init__(self, client: Client, session: str, start: Cursor,
                 kinds: Sequence[int] | None, create: bool,
                 convert: Callable[[Record], T | None], presence: bool = False,
                 on_view: Callable[[_frames.View], None] | None = None) -> None:
        self.client = client
        self.session = session
        self.presence = presence         # attached with presence: see presence_events
        self.members: dict[str, Member] = {}   # the session's members as last heard, by id
        self._changes: deque[PresenceEvent] = deque()  # for presence_events, bounded
        self._changes_wake = anyio.Event()
        self.kinds = None if kinds is None else tuple(kinds)
        self.epoch = start.epoch
        self.up_to_date = False          # caught up once: read all that was durable at attach
        self._cursor = start.offset      # START or NOW until the first attach resolves it
        self._create = create
        self._convert = convert
        self._next: int | None = None    # where to attach again: past what was received
        # Records, up_to_date offsets, and the view of an attach with one.
        self._buffer: deque[Record | int | _frames.View] = deque()
        self._on_view = on_view          # attach with a view first, and hand it here
        self._viewing = False            # the attach in flight asked for a view
        self._resolved = anyio.Event()   # attached once (or ended): see attached()
        self._held = 0                   # records in the buffer
        self._consumed = 0               # records yielded since credit was last granted
        self._end: BaseException | None = None        # raised once the buffer is empty
        self._conn: Connection | None = None          # attached or attaching on it
        self._attached = False
        self._retry_at = -math.inf
        self._failures = 0
        self._registered = False
        self._closed = False
        self._iterating = False
        self._wake = anyio.Event()

    @property
    def cursor(self) -> Cursor:
        return Cursor(self._cursor, self.epoch)

    # ------------------------------------------------------------ caller side

    async def _open(self) -> None:
        if self._registered:
            return
        self.client._check_open()
        old = self.client._subs.get(self.session)
        if old is not None and old is not self:
            if old._iterating:
                raise ClientError("already_subscribed", f"session {self.session!r} already has "
                                  "a subscription being iterated on this client", self.session)
            await old.aclose()
        self._registered = True
        self.client._subs[self.session] = self
        self.client._poke()

    async def __aenter__(self) -> Subscription[T]:
        await self._open()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def attached(self) -> Cursor:
        """Wait until the subscription is attached, so that ``"now"`` and
        ``"-1"`` are resolved to an offset, and return its cursor: nothing
        published after this returns is missed.  Raises as iterating would
        if it ended first."""
        if not self._closed:
            await self._open()
        await self._resolved.wait()
        end = self._end
        if end is not None and not isinstance(end, StopAsyncIteration):
            raise end.with_traceback(None)
        if self._next is None:
            raise ClientError("subscription_closed", "the subscription was closed before it "
                              "attached", self.session)
        return Cursor(self._cursor if self._cursor >= 0 else self._next, self.epoch)

    def __aiter__(self) -> Subscription[T]:
        return self

    async def __anext__(self) -> T:
        await self._open()
        if self._iterating:
            raise ClientError("already_iterating", "another task is iterating this "
                              "subscription", self.session)
        self._iterating = True
        try:
            while True:
                if self._closed and self._end is None:
                    raise StopAsyncIteration
                if self._buffer:
                    item = self._buffer.popleft()
                    if isinstance(item, int):
                        # Past what a kinds filter skipped, and never past a
                        # record still buffered (those come after ``item``).
                        self._cursor = max(self._cursor, item)
                        self.up_to_date = True
                        continue
                    if isinstance(item, _frames.View):
                        self._cursor = max(self._cursor, item.next)
                        if self._on_view is not None:
                            self._on_view(item)
                        continue
                    self._held -= 1
                    self._consumed += 1
                    self._cursor = item.offset + 1
                    if self._consumed >= max(1, self.client.window // 2):
                        self.client._poke()       # the pump grants more credit
                    out = self._convert(item)
                    if out is not None:
                        return out
                    continue
                if self._end is not None:
                    await self._release()
                    raise self._end.with_traceback(None)
                self._wake = anyio.Event()
                await self._wake.wait()
        finally:
            self._iterating = False

    async def aclose(self) -> None:
        """End the subscription (detaching on the server)."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._changes_wake.set()
        self._resolved.set()
        await self._release()

    async def _release(self) -> None:
        self._closed = True
        if self.client._subs.get(self.session) is self:
            del self.client._subs[self.session]
        conn, self._conn = self._conn, None
        if conn is not None and self._end is None and conn._gone is None:
            with anyio.move_on_after(5):
                try:
                    await conn.detach(self.session)
                except ClientError:
                    pass           # gone, or already ended: either way not attached
        self.client._poke()        # a successor may be waiting for the session's route

    def _fail(self, error: BaseException) -> None:
        if self._end is None:
            self._end = error
        self._wake.set()
        self._changes_wake.set()
        self._resolved.set()

    # ------------------------------------------------------------ presence

    def presence_events(self) -> PresenceEvents:
        """The session's presence changes, for a subscription made with
        ``presence=True`` (WebSocket only: over HTTP none come): a ``sync``
        with the whole set first and after every reconnect, then ``join``
        and ``leave``.  ``members`` always holds the set as last heard.  At
        most 1,000 events wait for the caller; past that they are replaced
        by one ``sync``.  Iteration ends with the subscription."""
        if not self.presence:
            raise ValueError("subscribe with presence=True to receive presence events")
        return PresenceEvents(self)

    def _on_presence(self, frame: _frames.Members | _frames.Join | _frames.Leave) -> None:
        if isinstance(frame, _frames.Members):
            self.members = {m.id: m for m in frame.members}
            self._changes.clear()          # the whole set says all they said
            event = PresenceEvent("sync", members=frame.members)
        elif isinstance(frame, _frames.Join):
            self.members[frame.member.id] = frame.member
            event = PresenceEvent("join", frame.member)
        else:
            self.members.pop(frame.member.id, None)
            event = PresenceEvent("leave", frame.member)
        if len(self._changes) >= _MAX_PRESENCE_EVENTS:
            # The caller does not keep up: what it missed is in the set.
            self._changes.clear()
            event = PresenceEvent("sync", members=tuple(self.members.values()))
        self._changes.append(event)
        self._changes_wake.set()

    # ------------------------------------------------------------ the pump's side

    async def _service(self, conn: Connection, now: float) -> float:
        if self._closed or self._end is not None:
            return math.inf
        if self._conn is conn:
            if self._attached and self._consumed >= max(1, self.client.window // 2):
                n, self._consumed = self._consumed, 0
                await conn.send(_frames.Credit(self.session, n))
            return math.inf
        if self._retry_at > now:
            return self._retry_at
        if conn.has_route(self.session):
            return math.inf          # the previous subscription's detach is in flight
        offset = self._next if self._next is not None else self._cursor
        # A view comes with the first attach, from where the view ends, and
        # only over the WebSocket (an HTTP transport would read from "now").
        view = self._on_view is not None and self._next is None \
            and isinstance(conn.transport, WebSocketTransport)
        request_id = conn.next_id()
        self._conn, self._attached, self._viewing = conn, False, view
        self._consumed = 0
        frame = _frames.Attach(request_id, self.session, NOW if view else offset, self.epoch,
                               self.kinds, max(1, self.client.window - self._held),
                               self._create and self._next is None, presence=self.presence,
                               view=view)
        await conn.send_request(frame, lambda a: self._on_attach(conn, a), self._on_frame)
        return math.inf

    def _on_attach(self, conn: Connection, answer: _frames.Frame | ClientError) -> None:
        if self._conn is not conn:
            return
        if isinstance(answer, ClientError):
            self._conn = None                 # attach again on the next connection
            return
        if isinstance(answer, Attached):
            self._attached = True
            self._failures = 0
            if self.epoch is None:
                self.epoch = answer.epoch
            # With a view, where it ends is the start; until the view is
            # here, a cut means asking for it again.
            if self._next is None and not self._viewing:
                self._next = answer.offset
                if self._cursor < 0:          # START or NOW, now resolved
                    self._cursor = answer.offset
            if not self._viewing:
                self._resolved.set()
            return
        if isinstance(answer, Event):
            self._conn = None
            self._fail(_ended(self.session, answer, self.epoch))
            return
        assert isinstance(answer, _frames.Error)
        self._conn = None
        delay = _retry_delay(self.client, answer, self._failures)
        if delay is not None:
            self._failures += 1
            self._retry_at = anyio.current_time() + delay
            self.client._poke()
            return
        self._fail(_client_error(answer))

    def _on_frame(self, frame: _frames.Frame | ClientError) -> None:
        if isinstance(frame, ClientError):
            self._conn, self._attached = None, False     # attach again on the next one
            return
        if self._closed:
            return
        if isinstance(frame, (_frames.Members, _frames.Join, _frames.Leave)):
            self._on_presence(frame)
            return
        if isinstance(frame, _frames.View):
            self._next, self._viewing = frame.next, False
            self._buffer.append(frame)       # before the records after it, as it came
            self._resolved.set()
        elif isinstance(frame, Data):
            nxt = self._next if self._next is not None else 0
            for record in frame.records:
                if record.offset >= nxt:     # never twice, whatever a server resends
                    self._buffer.append(record)
                    self._held += 1
                    nxt = record.offset + 1
            self._next = nxt
        elif isinstance(frame, UpToDate):
            self._next = max(self._next or 0, frame.next)
            self._buffer.append(frame.next)
        elif isinstance(frame, Event):
            self._conn = None
            if frame.event == "closed":
                self._end = StopAsyncIteration()
            else:
                self._end = _ended(self.session, frame, self.epoch)
        elif isinstance(frame, _frames.Error):
            self._conn = None
            self._end = _client_error(frame)
        self._wake.set()
        if self._end is not None:
            self._changes_wake.set()


_MAX_PRESENCE_EVENTS: Final = 1000


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """A change in a session's presence (``Subscription.presence_events``):
    ``join`` or ``leave`` of ``member``, or ``sync``: ``members`` is the
    whole set, which replaces what came before."""

    action: str                            # join, leave or sync
    member: Member | None = None           # for join and leave
    members: tuple[Member, ...] = ()       # for sync


class PresenceEvents:
    """An async iterator of a subscription's PresenceEvents."""

    def __init__(self, sub: Subscription[Any]) -> None:
        self._sub = sub

    def __aiter__(self) -> PresenceEvents:
        return self

    async def __anext__(self) -> PresenceEvent:
        sub = self._sub
        await sub._open()
        while not sub._changes:
            if sub._closed or sub._end is not None:
                raise StopAsyncIteration
            sub._changes_wake = anyio.Event()
            await sub._changes_wake.wait()
        return sub._changes.popleft()


@dataclass(frozen=True, slots=True)
class Signal:
    """A signal record, read by ``Session.signals``.

    By this client's convention a signal's meta is a map: ``"signal"`` names
    its type (``cancel``, ``approve``, ``input``, or the sender's own),
    ``"id"`` is unique per signal, ``"ref"`` is what it answers, if anything,
    and ``"approved"`` the answer of an ``approve``.  Signals sent some other
    way have ``type``, ``id`` and ``ref`` None."""

    record: Record
    type: str | None
    id: str | None
    ref: str | None

    @property
    def payload(self) -> bytes:
        return self.record.payload

    @property
    def offset(self) -> int:
        return self.record.offset

    @property
    def publisher(self) -> str | None:
        return self.record.publisher

    @property
    def meta(self) -> Any:
        return self.record.meta

    @property
    def approved(self) -> bool | None:
        meta = self.record.meta
        return bool(meta.get("approved")) if isinstance(meta, dict) and "approved" in meta \
            else None


def _signal_reader() -> Callable[[Record], Signal | None]:
    """Records -> Signals, dropping a repeat of an id seen lately.  This
    client's signals land once (they carry a producer stamp), but a sender
    using the ``signal`` frame, which has none, may store one twice when it
    sends again after a cut."""
    seen: set[str] = set()
    order: deque[str] = deque()

    def convert(record: Record) -> Signal | None:
        meta = record.meta if isinstance(record.meta, dict) else {}
        sid, kind, ref = meta.get("id"), meta.get("signal"), meta.get("ref")
        sid = sid if isinstance(sid, str) else None
        if sid is not None:
            if sid in seen:
                return None
            seen.add(sid)
            order.append(sid)
            if len(order) > 4096:
                seen.discard(order.popleft())
        return Signal(record, kind if isinstance(kind, str) else None, sid,
                      ref if isinstance(ref, str) else None)

    return convert


# ---------------------------------------------------------------- sessions

class Session:
    """One session, through a Client: publish, subscribe, signal."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name

    def __repr__(self) -> str:
        return f"<Session {self.name!r}>"

    async def publish(self, payloads: bytes | Sequence[bytes], *, kind: int = 0,
                      meta: Sequence[Any] | None = None, create: bool = False) -> range | None:
        """Append records, atomically, and wait until they are durable.

        Returns their offsets.  A resend after a cut that the server
        recognises as a duplicate is answered with the original's offsets,
        on any transport and across broker restarts; it returns None only if
        the broker no longer knows them (more than 64 later appends of this
        producer came between, or, across a restart, thousands of records),
        and the records are there once either way.  Calls made while earlier ones
        are on the wire may share one frame, and then succeed or fail
        together."""
        entry = self._entry(payloads, kind, meta, create)
        await self.client._pipe(self.name).submit(entry)
        return await entry.wait()

    def _entry(self, payloads: bytes | Sequence[bytes], kind: int,
               meta: Sequence[Any] | None, create: bool) -> _Entry:
        if isinstance(payloads, (bytes, bytearray, memoryview)):
            payloads = [bytes(payloads)]
        records = tuple(bytes(p) for p in payloads)
        if not records:
            raise ValueError("publish needs at least one record")
        metas = None if meta is None else tuple(meta)
        if metas is not None and len(metas) != len(records):
            raise ValueError(f"meta has {len(metas)} values for {len(records)} records")
        # The frame checks every field, here in the caller rather than in the pump.
        _frames.Publish(0, self.name, records, kind, metas, None, create)
        return _Entry(records, metas, kind, create)

    def subscribe(self, offset: int | str | Cursor = "-1", *, epoch: int | None = None,
                  kinds: Sequence[int] | None = None,
                  create: bool = False, presence: bool = False) -> Subscription[Record]:
        """Records from ``offset`` on: ``"-1"`` (the oldest retained), ``"now"``,
        an integer, an HTTP offset, or a saved ``Cursor`` (or its text).  An
        ``epoch`` (or the cursor's) makes a resume into a re-created session
        raise EpochChanged instead of reading the new session's records.
        With ``presence``, the subscription also keeps the session's
        ``members`` and gives their changes (``presence_events``)."""
        start = _start_of(offset, epoch)
        _frames.Attach(0, self.name, start.offset, start.epoch,
                       None if kinds is None else tuple(kinds), None, create)
        return Subscription(self.client, self.name, start, kinds, create, lambda record: record,
                            presence=presence)

    async def presence(self) -> list[Member]:
        """Who is attached to the session now (docs/protocol.md, "Presence"):
        WebSocket connections, SSE and long-poll readers, with their client
        id, transport and info.  Asked on the current connection (any
        transport); a connection lost meanwhile means asking on the next."""
        client = self.client
        failed: Connection | None = None
        while True:
            client._check_open()
            conn = client.connection
            if conn is None or conn is failed:
                await client._state_changed.wait()
                continue
            try:
                return await conn.presence(self.name)
            except ClientError:
                if conn._gone is None:
                    raise            # a refusal: forbidden, session_not_found, ...
                failed = conn

    def signals(self, offset: int | str | Cursor = "now", *,
                epoch: int | None = None) -> Subscription[Signal]:
        """The session's signals (kind 1) from ``offset`` on, as Signal
        objects: what an agent iterates to hear cancel, approve and input."""
        return Subscription(self.client, self.name, _start_of(offset, epoch), (1,), False,
                            _signal_reader())

    async def signal(self, payload: bytes = b"", *, type: str | None = None,
                     ref: str | None = None, meta: Mapping[str, Any] | None = None) -> int | None:
        """Send a signal (a durable record of kind 1); returns its offset once
        durable (None as for ``publish``).  Its meta is ``meta`` plus ``"id"``
        (new) and, if given, ``"signal": type`` and ``"ref": ref``.  It goes
        through the session's publish pipeline as a publish of kind 1, so it
        lands exactly once, in order with this client's other publishes; the
        token needs ``signal`` on the session, as for the ``signal`` frame.
        The payload goes as given (a JSON session takes only JSON): the
        typed signals below encode their text for the session."""
        full: dict[str, Any] = dict(meta or {})
        full["id"] = secrets.token_hex(8)
        if type is not None:
            full["signal"] = type
        if ref is not None:
            full["ref"] = ref
        got = await self.publish([bytes(payload)], kind=1, meta=[full])
        return None if got is None else got.start

    # The typed signals and messages of the AI message model (docs/ai.md):
    # their text goes by the session's payload rule, so they work on JSON
    # sessions too.

    async def cancel(self, reason: str = "", *, ref: str | None = None) -> int | None:
        """Ask the agent to stop (signal ``cancel``; the payload is the
        reason): the whole run, or with ``ref`` one message or tool call."""
        return await self._publish_draft((await self._encoder()).cancel(ref, reason))

    async def approve(self, ref: str | None = None, *, approved: bool = True,
                      note: str = "") -> int | None:
        """Answer a tool call that waits for approval (``ref`` is its id):
        approve it, or with ``approved=False`` reject it."""
        if ref is None:
            raise ValueError("approve needs ref: the id of the tool call it answers")
        return await self._publish_draft((await self._encoder()).approve(ref, approved, note))

    async def input(self, data: bytes | str, *, ref: str | None = None) -> int | None:
        """Send human input to the agent (signal ``input``)."""
        return await self._publish_draft((await self._encoder()).input(data, ref=ref))

    async def send_message(self, text: str, *, role: str = "user", id: str | None = None,
                           reply_to: str | None = None, create: bool = False) -> str:
        """Publish a whole message in one record (a ``start`` with outcome
        ``complete``), as a user's device does; returns its id once durable."""
        mid = id if id is not None else _convo.new_id("m")
        draft = (await self._encoder()).message(mid, role, text, reply_to=reply_to)
        await self._publish_draft(draft, create)
        return mid

    def stream_message(self, *, role: str | None = None, id: str | None = None,
                       reply_to: str | None = None, meta: Mapping[str, Any] | None = None,
                       window: float = 0.030, max_bytes: int = 16 << 10) -> MessageStream:
        """A message written piece by piece (model tokens): see MessageStream."""
        return MessageStream(self, role=role, id=id, reply_to=reply_to, meta=meta,
                             window=window, max_bytes=max_bytes)

    def conversation(self) -> Conversation:
        """The session's AI conversation as whole messages, kept up to date:
        see Conversation."""
        return Conversation(self)

    async def is_json(self) -> bool:
        """Whether this is a JSON session (content type ``application/json``),
        whose text payloads are JSON strings (docs/ai.md, "Payloads").  The
        typed signals, ``send_message``, ``stream_message`` and
        ``conversation`` write and read text by it.

        ``Client.session(name, json=...)`` says it; else the client asks
        once (a HEAD over the broker's HTTP API, which the WebSocket does not
        tell) and keeps the answer.  A session that does not exist yet counts
        as binary, what ``create=True`` makes, and so does one the client
        cannot ask about (no HTTP API behind the URL, a token that may not
        read it)."""
        known = self.client._json.get(self.name)
        return await self._ask_json() if known is None else known

    async def _ask_json(self) -> bool:
        client = self.client
        base = _http_base(client.url)
        if base is None or importlib.util.find_spec("httpx") is None:
            client._json[self.name] = False
            return False
        import httpx
        url = f"{base}/v1/stream/{quote(self.name, safe='/:@+=,~-._')}"
        for attempt in itertools.count():
            client._check_open()
            token = await client._token_now()
            headers = {} if token is None else {"Authorization": f"Bearer {token}"}
            try:
                async with httpx.AsyncClient(verify=client._ssl_context or True,
                                             timeout=client._connect_timeout) as http:
                    resp = await http.head(url, headers=headers)
                if resp.status_code < 500 and resp.status_code not in _HTTP_RETRY_STATUSES:
                    break
            except (httpx.HTTPError, OSError):
                pass                     # a cut, or the broker restarting: as for a connection
            await anyio.sleep(client.backoff.delay(attempt, client._rng))
        is_json = resp.status_code == 200 \
            and media_type(resp.headers.get("content-type", "")) == "application/json"
        if resp.status_code != 404:      # one that does not exist yet may be made either way
            client._json[self.name] = is_json
        return is_json

    async def _encoder(self) -> _convo.Encoder:
        return _convo.Encoder(json=await self.is_json())

    async def _publish_draft(self, draft: _convo.Draft, create: bool = False) -> int | None:
        got = await self.publish([draft.payload], kind=draft.kind, meta=[draft.meta],
                                 create=create)
        return None if got is None else got.start


class MessageStream:
    """A message of the AI message model, streamed as it is produced::

        async with session.stream_message() as m:
            async for token in model_stream:
                await m.append(token)

    Entering publishes the message's ``start`` (kind 2; meta ``id``,
    ``role``, ``reply_to`` if given, and any extra ``meta``).  Appends are
    gathered by a ``_convo.Coalescer`` for ``window`` seconds from the first
    of a batch, or until ``max_bytes``, and each batch is published as one
    ``delta`` (kind 3, meta ``{"id"}``), pipelined: ``append`` does not wait
    for acks, and 200 tokens a second make about 34 records, not 200.
    Leaving publishes the ``end`` (kind 4) holding what is still gathered,
    with the outcome: ``complete``; ``cancelled`` if the block was
    cancelled; ``error`` if it raised (``error`` then says what).  Text goes
    by the session's payload rule (Session.is_json).

    A normal exit waits until every record is durable and raises the first
    failure.  An exit by exception queues the end without waiting (the block
    may be cancelled) and lets the exception go on; ``wait()`` waits later.
    ``offsets`` then holds each record's offsets, ``records`` how many there
    are, ``appends`` how many appends made them, and ``text`` the whole
    text."""

    def __init__(self, session: Session, *, role: str | None, id: str | None,
                 reply_to: str | None, meta: Mapping[str, Any] | None, window: float,
                 max_bytes: int) -> None:
        extra = dict(meta or {})
        self.session = session
        self.id = id if id is not None else _convo.new_id("m")
        self.role = role if role is not None else str(extra.get("role", "assistant"))
        self.reply_to = reply_to
        self.outcome: str | None = None          # once the block has ended
        self.error: str | None = None
        self.offsets: list[range | None] = []
        self.appends = 0
        self._extra = extra                       # more start meta; the model's keys win
        self._encoder = _convo.Encoder()          # for the session's rule, once entered
        self._encoder.start(self.id, self.role, reply_to=reply_to)   # checks them here
        self._coalescer = _convo.Coalescer(window, max_bytes)
        self._data = bytearray()                  # everything appended
        self._entries: list[_Entry] = []          # its records, in order
        self._due = anyio.Event()                 # a batch opened: the timer has a deadline
        self._scope = anyio.CancelScope()         # the timer's
        self._failure: ClientError | None = None  # a batch the timer could not queue
        self._ended = False

    @property
    def text(self) -> str:
        return self._data.decode("utf-8", "replace")

    @property
    def records(self) -> int:
        return len(self._entries)

    async def __aenter__(self) -> MessageStream:
        client = self.session.client
        client._check_open()
        self._encoder = await self.session._encoder()
        start = self._encoder.start(self.id, self.role, reply_to=self.reply_to)
        await self._pipe().wait_for_room()
        self._send(start.kind, {**self._extra, **start.meta}, start.payload)
        assert client._tg is not None
        client._tg.start_soon(self._timer)
        return self

    async def append(self, delta: bytes | str) -> None:
        """Add text (``str``, or UTF-8 ``bytes``); it goes out within the window."""
        if self._ended:
            raise ClientError("stream_ended", "append after the message ended", self.session.name)
        if self._failure is not None:
            raise self._failure.with_traceback(None)
        if not delta:
            return
        await self._pipe().wait_for_room()
        # From here on nothing awaits: a batch is taken from the coalescer
        # only as it is queued, so batches keep their order (the timer takes
        # them too) and a cancelled append loses nothing.
        data = delta.encode() if isinstance(delta, str) else bytes(delta)
        self._data += data
        self.appends += 1
        for batch in self._coalescer.push(anyio.current_time(), data):
            self._send_delta(batch.data)
        self._due.set()

    async def flush(self) -> None:
        """Send what is gathered now, without waiting for the window."""
        await self._pipe().wait_for_room()
        batch = self._coalescer.flush(anyio.current_time())
        if batch is not None:
            self._send_delta(batch.data)

    async def wait(self) -> None:
        """Wait until every record queued so far is durable (``offsets``
        then holds them); raises the first failure."""
        error = self._failure
        offsets: list[range | None] = []
        for entry in self._entries:
            try:
                offsets.append(await entry.wait())
            except ClientError as exc:
                offsets.append(None)
                error = error or exc
        self.offsets = offsets
        if error is not None:
            raise error

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._ended = True
        self._scope.cancel()
        if et is None:
            outcome, error = _convo.COMPLETE, None
            await self._pipe().wait_for_room()
        elif issubclass(et, anyio.get_cancelled_exc_class()):
            outcome, error = _convo.CANCELLED, None
        else:
            outcome, error = _convo.ERROR, _describe(e)
        self.outcome, self.error = outcome, error
        last = self._coalescer.flush(anyio.current_time())
        end = self._encoder.end(self.id, outcome=outcome, error=error)
        try:
            self._send(end.kind, end.meta, self._text(last.data if last is not None else b""))
        except ClientError:
            if et is None:
                raise
            return                      # the client is closed: the caller's error goes on
        if et is None:
            await self.wait()

    async def _timer(self) -> None:
        """Send each batch when its window has passed."""
        pipe = self._pipe()
        with self._scope:
            try:
                while True:
                    deadline = self._coalescer.deadline()
                    if deadline is None:
                        self._due = anyio.Event()
                        await self._due.wait()
                        continue
                    await anyio.sleep_until(deadline)
                    await pipe.wait_for_room()
                    batch = self._coalescer.poll(anyio.current_time())
                    if batch is not None:
                        self._send_delta(batch.data)
            except ClientError as exc:
                self._failure = exc

    def _pipe(self) -> _Pipeline:
        return self.session.client._pipe(self.session.name)

    def _text(self, data: bytes) -> bytes:
        # A JSON string must hold whole characters; a batch of bytes
        # appended in pieces may not.
        return self._encoder.text(data.decode("utf-8", "replace") if self._encoder.json else data)

    def _send_delta(self, data: bytes) -> None:
        self._send(_convo.Kind.DELTA.value, {"id": self.id}, self._text(data))

    def _send(self, kind: int, meta: dict[str, Any], payload: bytes) -> None:
        entry = self.session._entry([payload], kind, [meta], False)
        self._pipe().enqueue(entry)
        self._entries.append(entry)


def _describe(exc: BaseException | None) -> str:
    """An exception as the ``error`` of a message or tool call: its type and message."""
    if exc is None:
        return "error"
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:500]


# ---------------------------------------------------------------- conversations

class Conversation:
    """A session's AI conversation (docs/ai.md), kept up to date: the fold
    (``_convo.Conversation``) of its records, fed by a subscription::

        async with session.conversation() as convo:
            view = await convo.wait(lambda v: v.messages and not v.messages[-1].open)
            for m in view.messages:
                print(m.role, m.text)

    Over the WebSocket it attaches with a view: the broker sends the
    conversation so far as whole messages (a snapshot exact at an offset)
    and then the records from that offset, so a late joiner does not read
    every delta again.  Over HTTP it folds the log from its start.  Either
    way it then folds each record as it arrives, across reconnects, so
    ``view()`` is always a fold of the log up to ``view().next``.  A session
    deleted and created again starts a fresh fold.  It holds the client's one
    subscription to the session.

    ``records`` counts the records folded here, ``views`` the views it
    started from."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.records = 0
        self.views = 0
        self._fold: _convo.Conversation | None = None    # None until the first view or record
        self._changed = anyio.Event()
        self._scope = anyio.CancelScope()                 # the reader's
        self._finished = anyio.Event()                    # the reader has detached
        self._failure: ClientError | None = None          # why reading stopped

    @property
    def fold(self) -> _convo.Conversation | None:
        """The fold itself (None before anything was read)."""
        return self._fold

    def view(self) -> _convo.View:
        """The conversation as folded so far; ``next`` says how far."""
        return (self._fold or _convo.Conversation()).view()

    async def wait(self, until: Callable[[_convo.View], Any]) -> _convo.View:
        """Wait until ``until(view)`` is true; returns that view.  Raises
        why reading stopped if it stops first: ``session_closed`` (closed and
        read to its end), a refusal, or a closed client."""
        while True:
            changed = self._changed
            view = self.view()
            if until(view):
                return view
            if self._failure is not None:
                raise self._failure.with_traceback(None)
            await changed.wait()

    async def __aenter__(self) -> Conversation:
        client = self.session.client
        client._check_open()
        assert client._tg is not None
        client._tg.start_soon(self._read)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop reading (detaching on the server); ``view()`` stays as it was."""
        self._scope.cancel()
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await self._finished.wait()

    async def _read(self) -> None:
        """Fold until the block ends.  Runs in the client's task group, so it
        never raises: what stops it is kept for ``wait``."""
        name = self.session.name
        with self._scope:
            try:
                while True:
                    sub: Subscription[Record] = Subscription(
                        self.session.client, name, Cursor(START), None, False,
                        lambda record: record, on_view=self._restore)
                    try:
                        async for record in sub:
                            if self._fold is None:
                                self._fold = _convo.Conversation(
                                    json=await self.session.is_json())
                            self._fold.apply_record(record)
                            self.records += 1
                            self._notify()
                        raise ClientError("session_closed", "the session was closed and read "
                                          "to its end", name)
                    except EpochChanged:
                        self._fold = None          # another session now: fold it afresh
                        self._notify()
                    finally:
                        # Detach even when cancelled: a detach left unsent
                        # would hold the session's route on this connection.
                        with anyio.CancelScope(shield=True):
                            await sub.aclose()
            except ClientError as exc:
                self._failure = exc
            except ValueError as exc:              # a view that is not a snapshot
                self._failure = ClientError("bad_view", str(exc), name)
            finally:
                self._notify()
                self._finished.set()

    def _restore(self, frame: _frames.View) -> None:
        self._fold = _convo.Conversation.from_snapshot(frame.view)
        self.session.client._json.setdefault(self.session.name, self._fold.json)
        self.views += 1
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()


# ---------------------------------------------------------------- connect

@asynccontextmanager
async def connect(url: str, *, token: TokenSource = None, client_id: str | None = None,
                  ssl_context: ssl.SSLContext | None = None, backoff: Backoff | None = None,
                  connect_timeout: float = 10.0, window: int = 1000,
                  max_retry_wait: float = 60.0, dial: Dial | None = None,
                  transports: Sequence[str] = ("ws", "sse", "longpoll"),
                  read_timeout: float = 75.0,
                  rng: random.Random | None = None,
                  presence_info: Mapping[str, Any] | None = None) -> AsyncIterator[Client]:
    """Run a Client for the block: it connects, and reconnects whenever the
    connection drops, until the block ends.

    ``token`` is a JWT, or a callable (sync or async) returning a fresh one,
    called for every hello and whenever the server says the token is
    expiring.  ``client_id`` goes in hello (with auth on it must be the
    token's sub, or None).  ``ssl_context`` is for a ``wss://`` URL whose
    certificate the system does not trust.  ``window`` is how many records a
    subscription may hold unread.  A refusal whose ``retry_after`` is over
    ``max_retry_wait`` seconds is raised instead of waited out.  ``dial``
    replaces the transports (it takes the URL and returns a Transport).

    ``transports`` are tried in that order: ``"ws"`` (the WebSocket at
    ``url``), then ``"sse"`` and ``"longpoll"`` over the Durable Streams HTTP
    API of the same broker (``url`` must end in ``/v1/ws`` for those).  One
    that fails to open twice in a row while the broker still answers plain
    HTTP is given up for the next; ``Client.transport`` says which is in
    use.  ``read_timeout`` is how long an HTTP read may hear nothing.
    ``presence_info`` (a small flat map, e.g. ``{"role": "agent"}``) is what
    this client shows in the presence of the sessions it subscribes to.

    Entering waits for the first connection; it raises the error if that
    can never succeed (a refused token, a bad URL, a certificate that does
    not verify), and keeps trying through errors that may pass (a server
    that is not up yet), up to ``backoff.give_up_after``."""
    base = _http_base(url)
    if importlib.util.find_spec("httpx") is None:
        base = None                      # the HTTP transports need httpx
    dials: list[tuple[str, Dial]] = []
    if dial is not None:
        dials.append(("custom", dial))
    for name in () if dial is not None else transports:
        if name == "ws":
            dials.append((name, lambda u: dial_websocket(u, ssl_context=ssl_context,
                                                         timeout=connect_timeout)))
        elif name not in ("sse", "longpoll"):
            raise ValueError(f"unknown transport {name!r}: use ws, sse or longpoll")
        elif base is not None:
            dials.append((name, functools.partial(
                _dial_http_for, base, name, ssl_context, connect_timeout, read_timeout)))
        elif len(transports) == 1:
            raise ClientError("bad_url", f"no HTTP transport for {url[:100]!r}: the URL "
                              "must end in /v1/ws, and httpx must be installed")
    answers = None if base is None else functools.partial(
        _http_answers, base, ssl_context, connect_timeout)
    c = Client(url, token=token, client_id=client_id, dial=dials,
               backoff=backoff or Backoff(), connect_timeout=connect_timeout, window=window,
               max_retry_wait=max_retry_wait, rng=rng, http_answers=answers,
               presence_info=presence_info)
    c._ssl_context = ssl_context
    failed: ClientError | None = None
    try:
        async with anyio.create_task_group() as tg:
            c._tg = tg
            tg.start_soon(c._supervise)
            await c.wait_for(State.CONNECTED, State.CLOSED)
            if c.state is State.CLOSED:
                failed = c.error
                tg.cancel_scope.cancel()
            else:
                try:
                    yield c
                finally:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                        await c.aclose()
                    tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        exc = _unwrap(group)
        if exc is None:
            raise
        raise exc from exc.__cause__
    if failed is not None:
        raise failed.with_traceback(None)
