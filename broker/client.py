"""A Python client for the WebSocket protocol (docs/protocol.md), on Trio.

This is the protocol's thin client: one connection, requests answered by id,
and each attached session's frames delivered in order.  It does not reconnect
by itself; it keeps what a caller needs to resume (``Subscription.offset`` and
``epoch``), and ``attach`` takes them back.

    async with broker.client.connect("ws://127.0.0.1:4437/v1/ws", client="agent") as c:
        ack = await c.publish("chat/1", [b"hello"], create=True)
        sub = await c.attach("chat/1", offset=-1)
        async for record in sub:
            print(record.offset, record.payload)

Theory of operation: one task reads the socket and decodes frames (_frames);
answers (``attached``, ``ack``, ``detached`` and errors carrying an ``id``)
complete the request that is waiting for that id; ``data``, ``up_to_date``
and ``event`` frames go to the session's Subscription, which a caller iterates;
the server's ``ping`` is answered at once.  An error about the whole
connection (a refused hello, an expired token) is kept, and when the server
then closes, every waiting request and subscription fails with it, so a
caller sees ``ClientError("token_expired")`` rather than a bare close.

Tokens: ``connect(url, token=...)`` sends the token in ``hello``;
``Client.refresh`` replaces it on a live connection, and ``Client.expiring``
is set when the server warns that the token is about to expire.
"""

from __future__ import annotations


import itertools
import math
import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_websocket

from . import _frames
from ._frames import Ack, Attached, Data, Event, Record, UpToDate
from ._handshake import SUBPROTOCOL

__all__ = ["Client", "ClientError", "Record", "Subscription", "connect"]


class ClientError(Exception):
    """The server answered a request with an error frame (or closed the
    connection: then ``code`` is the error it sent before closing, or
    ``connection_closed``)."""

    def __init__(self, code: str, message: str, session: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.session = session
        self.retry_after = retry_after       # seconds, for rate_limited


def _client_error(frame: _frames.Error) -> ClientError:
    return ClientError(frame.code, frame.message, frame.session, frame.retry_after)


class SessionEnded(ClientError):
    """The subscription ended with an event: ``closed``, ``deleted`` or
    ``epoch_changed`` (then ``epoch`` is the new one, and the caller must reset)."""

    def __init__(self, session: str, event: str, epoch: int | None) -> None:
        super().__init__(event, f"session {session!r}: {event}", session)
        self.event = event
        self.epoch = epoch


class Subscription:
    """An attached session.  Iterate it for records; ``offset`` is where a
    resume would start (the offset after the last record or up_to_date)."""

    def __init__(self, client: Client, attached: Attached) -> None:
        self.client = client
        self.session = attached.session
        self.epoch = attached.epoch
        self.offset = attached.offset
        self.up_to_date = False
        self.ended: SessionEnded | ClientError | None = None
        self._send, self._recv = trio.open_memory_channel[_frames.Frame](math.inf)
        self._records: deque[Record] = deque()      # of the data frame being iterated

    def _deliver(self, frame: _frames.Frame) -> None:
        self._send.send_nowait(frame)

    async def next_frame(self) -> _frames.Frame:
        """The next data, up_to_date, event or error frame for this session
        (a lower level than iterating; use one or the other)."""
        frame = await self._recv.receive()
        if isinstance(frame, Data):
            self.offset = frame.records[-1].offset + 1
        elif isinstance(frame, UpToDate):
            self.offset = frame.next
            self.up_to_date = True
        return frame

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Record:
        """The next record.  Ends at a ``closed`` event; raises SessionEnded for
        the other events and ClientError for an error.  ``offset`` moves past a
        record only once it is returned, so a caller that stops part-way
        through a data frame resumes at the next record."""
        while not self._records:
            frame = await self._recv.receive()
            if isinstance(frame, Data):
                self._records.extend(frame.records)
            elif isinstance(frame, UpToDate):
                self.offset = frame.next
                self.up_to_date = True
            elif isinstance(frame, Event):
                self.ended = SessionEnded(self.session, frame.event, frame.epoch)
                if frame.event == "closed":
                    raise StopAsyncIteration
                raise self.ended
            elif isinstance(frame, _frames.Error):
                self.ended = ClientError(frame.code, frame.message, self.session,
                                         frame.retry_after)
                raise self.ended
        record = self._records.popleft()
        self.offset = record.offset + 1
        return record

    async def credit(self, n: int) -> None:
        await self.client.send(_frames.Credit(self.session, n))

    async def detach(self) -> None:
        await self.client._request(_frames.Detach(self.client._next_id(), self.session))
        self.client._subs.pop(self.session, None)


class Client:
    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.welcome: _frames.Welcome | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list[_frames.Frame]]] = {}
        self._subs: dict[str, Subscription | _Pending] = {}
        self._welcomed = trio.Event()
        self._nursery: trio.Nursery | None = None
        # Set when the server warns that the token expires soon; a fresh
        # Event after each refresh.  ``expiring_ttl`` is the seconds it gave.
        self.expiring = trio.Event()
        self.expiring_ttl: float | None = None
        # The latest error about the whole connection (no id, no session).
        self.error: ClientError | None = None

    def _next_id(self) -> int:
        return next(self._ids)

    async def send(self, frame: _frames.Frame) -> None:
        """Send any frame as it is (no answer awaited)."""
        await self.ws.send_message(_frames.encode(frame))

    async def _request(self, frame: Any) -> _frames.Frame:
        done = trio.Event()
        slot: list[_frames.Frame] = []
        self._waiting[frame.id] = (done, slot)
        await self.send(frame)
        await done.wait()
        answer = slot[0]
        if isinstance(answer, _frames.Error):
            raise _client_error(answer)
        return answer

    async def refresh(self, token: str) -> _frames.Refreshed:
        """Replace the connection's token with a fresh one for the same sub;
        its capabilities apply at once.  Raises ClientError if it is refused
        (``client_mismatch`` also closes the connection)."""
        answer = await self._request(_frames.Refresh(self._next_id(), token))
        assert isinstance(answer, _frames.Refreshed)
        self.expiring = trio.Event()
        self.expiring_ttl = None
        return answer

    async def publish(self, session: str, payloads: Sequence[bytes], *, kind: int = 0,
                      meta: Sequence[Any] | None = None, producer: tuple[str, int, int] | None = None,
                      create: bool = False) -> Ack:
        """Append records and wait until they are durable; returns the ack."""
        answer = await self._request(_frames.Publish(
            self._next_id(), session, tuple(payloads), kind,
            None if meta is None else tuple(meta),
            None if producer is None else _frames.Producer(*producer), create))
        assert isinstance(answer, Ack)
        return answer

    async def signal(self, session: str, payload: bytes, meta: Any = None) -> Ack:
        answer = await self._request(_frames.Signal(self._next_id(), session, payload, meta))
        assert isinstance(answer, Ack)
        return answer

    async def attach(self, session: str, offset: int | str = "now", *, epoch: int | None = None,
                     kinds: Sequence[int] | None = None, credit: int | None = None,
                     create: bool = False) -> Subscription:
        """Attach from ``offset`` (an int, "-1", "now" or an HTTP offset).

        Raises SessionEnded if the session is gone or its epoch is not
        ``epoch``, and ClientError for other refusals."""
        frame = _frames.Attach(self._next_id(), session, _frames.parse_offset(offset), epoch,
                               None if kinds is None else tuple(kinds), credit, create)
        pending = _Pending(session)
        self._subs[session] = pending       # catches an event that answers instead
        try:
            answer = await self._request(frame)
        except ClientError:
            self._subs.pop(session, None)
            raise
        if isinstance(answer, Event):
            self._subs.pop(session, None)
            raise SessionEnded(session, answer.event, answer.epoch)
        assert isinstance(answer, Attached)
        sub = Subscription(self, answer)
        for early in pending.frames:
            sub._deliver(early)
        self._subs[session] = sub
        return sub

    async def _reader(self) -> None:
        while True:
            try:
                message = await self.ws.get_message()
            except trio_websocket.ConnectionClosed:
                break
            frame = _frames.decode(message if isinstance(message, bytes) else message.encode())
            self._dispatch(frame)
        if self.error is not None:
            gone = _frames.Error(self.error.code, self.error.message)
        else:
            reason = self.ws.closed
            gone = _frames.Error("connection_closed", "the connection closed" if reason is None
                                 else f"the connection closed ({reason.code} {reason.reason})")
        for done, slot in self._waiting.values():
            slot.append(gone)
            done.set()
        self._waiting.clear()
        for sub in self._subs.values():
            sub._deliver(gone)
        self._welcomed.set()          # connect() sees no welcome and raises

    def _dispatch(self, frame: _frames.Frame) -> None:
        if isinstance(frame, _frames.Welcome):
            self.welcome = frame
            self._welcomed.set()
            return
        if isinstance(frame, _frames.Ping):
            assert self._nursery is not None
            self._nursery.start_soon(self.send, _frames.Pong(frame.id))
            return
        if isinstance(frame, _frames.Expiring):
            self.expiring_ttl = frame.ttl
            self.expiring.set()
            return
        if isinstance(frame, _frames.Error) and frame.id is None and frame.session is None:
            self.error = _client_error(frame)    # the server closes after most of these
            return
        request_id = getattr(frame, "id", None)
        session = getattr(frame, "session", None)
        if isinstance(frame, Event) and session in self._subs \
                and isinstance(self._subs[session], _Pending):
            # An attach answered with an event instead of attached.
            for rid, (done, slot) in list(self._waiting.items()):
                slot.append(frame)
                del self._waiting[rid]
                done.set()
                break
            return
        if request_id is not None and request_id in self._waiting \
                and not isinstance(frame, _frames.Pong):
            done, slot = self._waiting.pop(request_id)
            slot.append(frame)
            done.set()
            return
        if session is not None and session in self._subs:
            self._subs[session]._deliver(frame)


class _Pending:
    """Frames that arrive for a session between attach and attached."""

    def __init__(self, session: str) -> None:
        self.session = session
        self.frames: list[_frames.Frame] = []

    def _deliver(self, frame: _frames.Frame) -> None:
        self.frames.append(frame)


@asynccontextmanager
async def connect(url: str, *, client: str | None = None, token: str | None = None,
                  ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Client]:
    """Open a connection, say hello, and yield the Client.  Raises
    ClientError if the hello is refused (``unauthorized``, ``token_invalid``,
    ``token_expired``, ``client_mismatch``).  ``ssl_context`` is for a
    ``wss://`` URL whose certificate the system does not trust (a private CA)."""
    async with trio_websocket.open_websocket_url(url, subprotocols=[SUBPROTOCOL],
                                                 message_queue_size=1024,
                                                 ssl_context=ssl_context) as ws:
        c = Client(ws)
        try:
            async with trio.open_nursery() as nursery:
                c._nursery = nursery
                nursery.start_soon(c._reader)
                await c.send(_frames.Hello(client, token))
                await c._welcomed.wait()
                if c.welcome is None:
                    nursery.cancel_scope.cancel()
                else:
                    try:
                        yield c
                    finally:
                        nursery.cancel_scope.cancel()
        finally:
            if ws.closed is not None:
                # trio-websocket 0.12 leaves the socket open when the server
                # closed first (its aclose returns early): close it here.
                stream = getattr(ws, "_stream", None)
                if isinstance(stream, trio.abc.AsyncResource):
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
    if c.welcome is None:            # raised out here, not wrapped in a nursery's group
        raise c.error or ClientError("connection_closed", "the connection closed before welcome")
