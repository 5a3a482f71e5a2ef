"""WebSocket sessions at /v1/ws: the fast path (docs/protocol.md, "WebSocket protocol").

Theory of operation
-------------------
After the HTTP upgrade (_handshake.py) a connection is two tasks in one
nursery, and never a queue of messages:

* The **reader** reads 64 KiB at a time and feeds the compiled ``FrameParser``
  (_core), which unmasks and returns every complete WebSocket message in the
  chunk.  Each message is decoded into a frame (_frames.py) and handled at
  once.  A ``publish`` is handed to the session's actor with
  ``submit_publish`` and the reader goes on: the actor answers through a
  callback that queues the ``ack``, so publishes are pipelined and the only
  wait is a full mailbox (the publisher's backpressure).

* The **writer** owns the socket's sending side.  It sleeps on one event; it
  is woken by queued control frames (acks, answers, errors) and by the session
  actors, which call each subscription's watcher when records become durable.
  Each round it takes the queued frames, then one batch for each subscription
  that is ready, and sends all of it with one ``send_all``.  A peer that does
  not read blocks only its own writer, so the writer stops reading that
  connection's cursors: nothing is buffered beyond one round (at most about
  ``max_round_bytes``), and nobody else slows down.

A **subscription** is a broker cursor (an offset, see _broker.Subscription),
a kind filter, a credit, and nothing else.  An attach with ``view`` first
gets the session's conversation from its actor (docs/ai.md, "Views"), sends
it as one ``view`` frame after ``attached``, and starts the cursor where the
view is exact.  Its data frames are built by
``_core.pack_data`` from a Batch straight into WebSocket frame bytes.  Server
frames are unmasked, so a frame is the same bytes for every subscriber of the
session at the same offset: each session keeps a small cache of recent frames
keyed by (epoch, offset, kinds), and the subscribers at the tail, which all
wake at the same offset after a commit, share one frame.  A subscriber that
lags reads bigger batches, from the ring or from disk, and builds its own.

Heartbeats: the writer sends a ``ping`` every ``heartbeat_s`` and closes the
connection (4008) if the previous ping has not been answered by then.

Presence (_presence.py): a subscription is a member of its session's presence
(unless it attached ``hidden``) from ``attached`` until it ends, however it
ends, so a connection that drops or times out leaves every session with it.
One that attached with ``presence`` watches the session: join and leave are
folded into its Feed as they happen, and the writer sends what the feed holds
once per round, like a cursor's batch, never a queue of events.

Tokens and limits
-----------------
``hello`` carries the token (or the upgrade URL does, ``?token=``, for
browsers, which cannot set headers on a WebSocket); the verified
``Principal`` is the connection's until a ``refresh`` replaces it, and its
``sub`` is the client id, stamped as the publisher of every record.  Each
request frame is checked against the principal's capabilities once, before
the session is looked up, so a refusal says nothing about whether the session
exists; nothing is checked per record.  The writer also keeps the connection's
one timer, ``deadline``: the hello timeout until a hello is accepted, then
the token's ``expiring`` warning and its expiry, in Trio time (the token's
wall-clock ``exp`` turned into seconds left when it was verified).  A refresh
moves the timer and applies the new capabilities at once: a subscription the
new token may not read is ended with ``forbidden``.  Publishes and signals
take their record count from the connection's token bucket, if a rate is set.

A peer that sends and never reads must not hold the server's memory or outlive
its deadlines: the reader stops reading while more than ``max_round_bytes``
of answers wait to be sent, and a send stuck on such a peer is cut at the
hello timeout or the token's expiry (``_cutoff``), which drops the connection.
"""

from __future__ import annotations

import itertools
import math
import socket
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import msgpack
import trio

from . import _core, _frames
from ._auth import APPEND, CREATE, READ, Authenticator, AuthError, Forbidden, Principal
from ._auth import SIGNAL as SIGNAL_OP
from ._broker import Broker, Subscription
from ._convo import Kind
from ._errors import (
    BrokerError,
    EpochChanged,
    InvalidSessionName,
    OffsetTooOld,
    SessionDeleted,
    SessionNotFound,
)
from ._limits import TokenBucket
from ._meta import MAX_NAME_BYTES, check_name, is_json_text, media_type
from ._presence import JOIN, Feed
from ._session import NOW, SIGNAL, ProduceResult, Reply, SessionActor


WS_PATH = "/v1/ws"

# Close codes of our own (RFC 6455 leaves 4000-4999 to applications).
CLOSE_HELLO = 4000          # hello missing or repeated
CLOSE_AUTH = 4001           # hello not authenticated, token expired, or refreshed as another sub
CLOSE_HELLO_TIMEOUT = 4002  # no accepted hello within hello_timeout_s
CLOSE_HEARTBEAT = 4008      # a ping went unanswered

_NOBODY = Principal(None, None, ())          # before hello: allowed nothing


@dataclass(frozen=True, slots=True)
class WsConfig:
    heartbeat_s: float = 25.0            # between the server's pings
    max_message: int = 1 << 20           # largest WebSocket message accepted (1009 beyond)
    max_publish_records: int = 10_000    # records in one publish
    max_round_bytes: int = 1 << 20       # data gathered for one send, across subscriptions
    close_timeout_s: float = 5.0         # how long the closing handshake may take
    max_sessions: int = 1_000            # sessions attached at once on one connection
    hello_timeout_s: float = 10.0        # a connection without an accepted hello is closed after
    publish_rate: float = 0.0            # records per second per connection; 0 is unlimited
    publish_burst: int = 0               # records saved in the bucket; 0 means max(1, rate)
    expiry_warning_s: float = 60.0       # ``expiring`` this long before the token expires

    def __post_init__(self) -> None:
        if self.heartbeat_s <= 0 or self.max_message < 1024 or self.max_publish_records < 1:
            raise ValueError("heartbeat_s must be positive, max_message at least 1 KiB, "
                             "max_publish_records at least 1")
        if (self.max_sessions < 1 or self.hello_timeout_s <= 0 or self.publish_rate < 0
                or self.publish_burst < 0 or self.expiry_warning_s < 0):
            raise ValueError("max_sessions and hello_timeout_s must be positive, the publish "
                             "rate, burst and expiry warning not negative")


# An attach with a view must receive every kind the fold reads (docs/ai.md).
_VIEW_KINDS = frozenset(int(k) for k in Kind)

_CACHE_ENTRIES = 32                 # frames kept per session
_CACHE_MAX_FRAME = 256 * 1024       # bigger frames are catch-up, rarely shared
_SCAN_COST = 16 * 1024              # what a read that sends nothing counts against a round


class _Fanout:
    """Data frames shared by the subscribers of one session on this server."""

    __slots__ = ("prefix", "frames", "users")

    def __init__(self, name: str) -> None:
        # The start of every data frame's msgpack map: {"t": "data", "s": name, "r": ...}
        self.prefix = (b"\x83" + msgpack.packb("t") + msgpack.packb("data") + msgpack.packb("s")
                       + msgpack.packb(name) + msgpack.packb("r"))
        # (epoch, offset, kinds mask) -> (frame or None, records, next offset)
        self.frames: dict[tuple[int, int, int], tuple[bytes | None, int, int]] = {}
        self.users = 0

    def put(self, key: tuple[int, int, int], value: tuple[bytes | None, int, int]) -> None:
        frames = self.frames
        frames[key] = value
        if len(frames) > _CACHE_ENTRIES:
            del frames[next(iter(frames))]          # the oldest entry


class _Sub:
    """One attached session on one connection."""

    __slots__ = ("name", "cursor", "mask", "credit", "behind", "fanout", "conn", "member",
                 "feed")

    def __init__(self, conn: _Conn, name: str, mask: int, credit: int | None,
                 fanout: _Fanout) -> None:
        self.conn = conn
        self.name = name
        self.cursor: Subscription | None = None
        self.mask = mask                  # bit k set: records of kind k are sent
        self.credit = credit              # records the client lets us send; None: no limit
        self.behind = True                # up_to_date is due when the tail is reached
        self.fanout = fanout
        self.member = False               # shown in the session's presence
        self.feed: Feed | None = None     # presence not yet sent, if the attach asked for it

    def presence_changed(self, kind: str, member: _frames.Member) -> None:
        """A presence watcher (_presence.py): note the change, never queue it."""
        feed = self.feed
        if feed is not None:
            feed.add(kind, member)
            conn = self.conn
            conn.presence_due[self] = None
            conn.wake.set()

    def mark(self) -> None:
        """The session has news: send it now if that is simple, else let the
        writer look at this subscription."""
        conn = self.conn
        if conn.waiting and not conn.out and not conn.ready and conn._direct(self):
            return
        conn.ready[self] = None
        conn.wake.set()


class WsServer:
    """Serves upgraded connections on /v1/ws."""

    def __init__(self, broker: Broker, config: WsConfig | None = None,
                 auth: Authenticator | None = None) -> None:
        self.broker = broker
        self.config = config or WsConfig()
        self.auth = auth or Authenticator()
        self._fanouts: dict[str, _Fanout] = {}
        self._conns: set[_Conn] = set()
        self._tag = secrets.token_hex(3)
        self._ids = itertools.count(1)

    @property
    def connections(self) -> int:
        return len(self._conns)

    async def serve(self, stream: trio.abc.Stream, leftover: bytes, target: str = "") -> None:
        """Run one connection after its 101 response was sent.  ``target`` is
        the upgrade request's target, whose query may carry ``token=``."""
        conn = _Conn(self, stream, f"{self._tag}-{next(self._ids)}", _url_token(target))
        self._conns.add(conn)
        try:
            await conn.run(leftover)
        finally:
            self._conns.discard(conn)
            conn.release()

    def shut_down(self) -> None:
        """Close every connection with 1001 (the clients reconnect elsewhere)."""
        for conn in list(self._conns):
            conn.close(1001, "server shutting down")

    def _fanout(self, name: str) -> _Fanout:
        fan = self._fanouts.get(name)
        if fan is None:
            fan = self._fanouts[name] = _Fanout(name)
        fan.users += 1
        return fan

    def _unfan(self, name: str) -> None:
        fan = self._fanouts.get(name)
        if fan is not None:
            fan.users -= 1
            if fan.users <= 0:
                del self._fanouts[name]


def _url_token(target: str) -> str | None:
    """The ``token`` query parameter of the upgrade request, if any."""
    query = urlsplit(target).query
    if "token=" not in query:
        return None
    return next((v for k, v in parse_qsl(query) if k == "token"), None)


def _frame(frame: _frames.Frame) -> bytes:
    return _core.build_frame(_core.OP_BINARY, _frames.encode(frame))


def _ack_frame(request_id: int, session: str, reply: Reply) -> bytes:
    """The answer to a publish, from the actor's reply."""
    err = reply.error
    if err is not None:
        if isinstance(err, trio.ClosedResourceError):
            return _frame(_frames.Error("unavailable", "the session was restarting; retry",
                                        session, request_id))
        code = err.code if isinstance(err, BrokerError) else "internal"
        return _frame(_frames.Error(code, str(err), session, request_id))
    value = reply.value
    if isinstance(value, range):
        return _frame(_frames.Ack(request_id, session, value.start, len(value)))
    assert isinstance(value, ProduceResult)
    if value.status == "accepted":
        assert value.offsets is not None
        return _frame(_frames.Ack(request_id, session, value.offsets.start, len(value.offsets)))
    if value.status == "duplicate":
        if value.offsets is None:        # landed before a restart: offsets not known
            return _frame(_frames.Ack(request_id, session, dup=True))
        return _frame(_frames.Ack(request_id, session, value.offsets.start,
                                  len(value.offsets), dup=True))
    code, message = {
        "stale_epoch": ("stale_producer_epoch", f"the producer is at epoch {value.epoch}"),
        "invalid_epoch_seq": ("invalid_epoch_seq", "a new producer epoch must start at seq 0"),
        "sequence_gap": ("producer_sequence_gap",
                         f"expected seq {value.expected_seq}, got {value.received_seq}"),
        "closed": ("session_closed", f"session {session!r} is closed to appends"),
    }[value.status]
    return _frame(_frames.Error(code, message, session, request_id))


class _Conn:
    def __init__(self, server: WsServer, stream: trio.abc.Stream, conn_id: str,
                 url_token: str | None = None) -> None:
        self.server = server
        self.broker = server.broker
        self.cfg = server.config
        self.stream = stream
        # The plain socket under a plain TCP stream, for _send's fast path.
        self._sock: socket.socket | None = (
            stream.socket._sock if isinstance(stream, trio.SocketStream)   # type: ignore[attr-defined]
            and isinstance(getattr(stream.socket, "_sock", None), socket.socket) else None)
        self.id = conn_id
        self.parser = _core.FrameParser(False, self.cfg.max_message)
        self.out: list[bytes] = []               # frames queued for the next round
        self.out_bytes = 0                       # their size, bounded by max_round_bytes
        self.drained = trio.Event()              # set when the writer takes ``out``
        self.wake = trio.Event()                 # set when there is something to send
        self.ready: dict[_Sub, None] = {}        # subscriptions to look at, in order
        self.subs: dict[str, _Sub] = {}
        self.presence_due: dict[_Sub, None] = {}  # subscriptions with presence to send
        self.client: str | None = None           # set by an accepted hello
        self.info: dict[str, Any] | None = None  # hello's presence info
        self.url_token = url_token               # ?token= of the upgrade; hello's wins
        self.principal = _NOBODY                 # what the token allows; set by hello
        self.expires_at = math.inf               # trio time at which the token expires
        self.warn_at = math.inf                  # trio time to send ``expiring``, if not yet sent
        # The writer's one timer: the hello timeout, then warn_at or expires_at.
        self.deadline = trio.current_time() + self.cfg.hello_timeout_s
        self.sending: trio.CancelScope | None = None    # the writer's send, cut at _cutoff()
        self.bucket = TokenBucket(self.cfg.publish_rate, self.cfg.publish_burst)
        self.awaiting_pong = False
        self.waiting = False                     # the writer is idle, waiting to be woken
        self.ping_ids = itertools.count(1)
        self.closing: tuple[int, str] | None = None
        self._cancel: trio.CancelScope | None = None

    # ------------------------------------------------------------ sending

    def send(self, data: bytes) -> None:
        self.out.append(data)
        self.out_bytes += len(data)
        self.wake.set()

    def error(self, code: str, message: str, session: str | None = None,
              request_id: int | None = None) -> None:
        self.send(_frame(_frames.Error(code, message, session, request_id)))

    def close(self, code: int, reason: str) -> None:
        """Send what is queued, then a close frame, then end the connection."""
        if self.closing is None:
            self.closing = (code, reason)
            self.wake.set()

    # ------------------------------------------------------------ running

    async def run(self, leftover: bytes) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                nursery.start_soon(self._guard, self._write_loop)
                await self._guard(self._read_loop, leftover)
                if self.closing is None:
                    nursery.cancel_scope.cancel()       # the peer went away
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(1):
                    await self.stream.aclose()

    async def _guard(self, loop: Callable[..., Any], *args: Any) -> None:
        """Run the reader or the writer; a dead socket ends the connection,
        quietly and without touching any other."""
        try:
            await loop(*args)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            assert self._cancel is not None
            self._cancel.cancel()

    def release(self) -> None:
        for sub in list(self.subs.values()):
            self._end(sub)

    async def _read_loop(self, data: bytes | bytearray) -> None:
        parser = self.parser
        while True:
            if data:
                for op, payload in parser.feed(data):
                    # Every request is answered, so a peer that sends and never
                    # reads would grow ``out`` without end: read nothing more
                    # until the writer has taken it.
                    while self.out_bytes > self.cfg.max_round_bytes and self.closing is None:
                        self.drained = trio.Event()
                        await self.drained.wait()
                    if self.closing is not None:
                        return
                    if op == _core.OP_BINARY:
                        await self._on_message(payload)
                    elif op == _core.OP_PING:
                        self.send(_core.build_frame(_core.OP_PONG, payload))
                    elif op == _core.OP_CLOSE:
                        try:
                            code, _ = _core.parse_close(payload)
                        except _core.WsProtocolError as exc:
                            self.close(exc.code, exc.reason)
                            return
                        self.close(1000 if code == 1005 else code, "")
                        return
                    elif op == _core.OP_TEXT:
                        self.close(1003, "frames are binary msgpack")
                        return
                if parser.error is not None:
                    self.close(parser.error.code, parser.error.reason)
                    return
                if self.closing is not None:
                    return
            data = await self.stream.receive_some(65536)
            if not data:
                return

    async def _write_loop(self) -> None:
        interval = self.cfg.heartbeat_s
        next_ping = trio.current_time() + interval
        while True:
            self.waiting = True
            try:
                with trio.move_on_at(min(next_ping, self.deadline)):
                    await self.wake.wait()
            finally:
                self.waiting = False
            if trio.current_time() >= self.deadline:
                self._on_deadline()
            if trio.current_time() >= next_ping:
                if self.awaiting_pong:
                    self.closing = (CLOSE_HEARTBEAT, "heartbeat timeout: no pong")
                else:
                    self.awaiting_pong = True
                    self.out.append(_frame(_frames.Ping(next(self.ping_ids))))
                next_ping = trio.current_time() + interval
            self.wake = trio.Event()
            chunks, self.out, self.out_bytes = self.out, [], 0
            self.drained.set()
            if self.presence_due and self.closing is None:
                self._presence(chunks)
            budget = self.cfg.max_round_bytes
            while self.ready and budget > 0 and self.closing is None:
                sub = next(iter(self.ready))
                del self.ready[sub]
                budget -= await self._pump(sub, chunks)
            if self.ready:
                self.wake.set()                          # more next round
            if chunks:
                # The last frames before a close get what the close gets.
                cutoff = (self._cutoff() if self.closing is None
                          else trio.current_time() + self.cfg.close_timeout_s)
                with trio.CancelScope(deadline=cutoff) as self.sending:
                    await self._send(b"".join(chunks) if len(chunks) > 1 else chunks[0])
                cut, self.sending = self.sending.cancelled_caught, None
                if cut:
                    # The peer stopped reading and the hello timeout, the
                    # token's expiry or the close timeout passed: the send may
                    # have stopped mid-frame, so nothing can follow.  Drop the
                    # connection.
                    assert self._cancel is not None
                    self._cancel.cancel()
                    return
            if self.closing is not None:
                await self._send_close(*self.closing)
                return

    def _try_send(self, data: bytes) -> int:
        """One plain non-blocking ``send`` (0 when the socket is full, or when
        the stream is not a plain socket): on a socket with room, the usual
        case, that is the whole cost, where Trio's ``send_all`` machinery
        costs several times more per call.  Only the writer, or ``_direct``
        while the writer is idle, sends, so sends never interleave."""
        if self._sock is None:
            return 0
        try:
            return self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    def _cutoff(self) -> float:
        """When the connection ends even if its peer has stopped reading (and
        so the writer is stuck in a send): the hello timeout before a hello,
        the token's expiry after it."""
        return self.expires_at if self.client is not None else self.deadline

    async def _send(self, data: bytes) -> None:
        n = self._try_send(data)
        if n < len(data):
            await self.stream.send_all(data[n:] if n else data)

    async def _send_close(self, code: int, reason: str) -> None:
        with trio.move_on_after(self.cfg.close_timeout_s):
            rest = b"".join(self.out)
            self.out, self.out_bytes = [], 0
            await self.stream.send_all(
                rest + _core.build_frame(_core.OP_CLOSE, _core.close_payload(code, reason)))
        assert self._cancel is not None
        self._cancel.cancel()

    # ------------------------------------------------------------ reading cursors

    async def _pump(self, sub: _Sub, chunks: list[bytes]) -> int:
        """Add the next batch of ``sub`` to ``chunks``; return the bytes added."""
        cursor = sub.cursor
        if cursor is None or self.subs.get(sub.name) is not sub:
            return 0                    # detached meanwhile
        try:
            actor = await cursor.live_actor()
            cursor.check(actor)
        except SessionDeleted:
            return self._event(sub, chunks, "deleted")
        except EpochChanged as exc:
            return self._event(sub, chunks, "epoch_changed", exc.actual)
        except BrokerError as exc:
            chunks.append(_frame(_frames.Error(exc.code, str(exc), sub.name)))
            self._end(sub)
            return 0
        committed = actor.committed
        offset = cursor.offset
        added = 0
        if offset < committed:
            credit = sub.credit
            if credit == 0:
                return 0                # a credit frame marks it ready again
            try:
                frame, count, nxt = self._frame_at(sub, actor, offset, credit)
            except OffsetTooOld as exc:
                chunks.append(_frame(_frames.Error(exc.code, str(exc), sub.name)))
                self._end(sub)
                return 0
            self._advance(sub, actor, nxt, count)
            # A read that matched nothing (a kind filter skipping a backlog)
            # still costs: charge it, so one round cannot scan without end.
            added = _SCAN_COST
            if frame is not None:
                chunks.append(frame)
                added = len(frame)
            if nxt < committed:
                sub.behind = True
                self.ready[sub] = None
                return added
        if sub.behind:
            sub.behind = False
            chunks.append(_frame(_frames.UpToDate(sub.name, cursor.offset)))
        meta = actor.meta
        if meta is not None and meta.closed and cursor.offset >= actor.committed:
            return added + self._event(sub, chunks, "closed")
        return added

    def _frame_at(self, sub: _Sub, actor: SessionActor, offset: int,
                  credit: int | None) -> tuple[bytes | None, int, int]:
        """The data frame from ``offset`` (shared if another subscriber built
        it): (frame or None, records in it, next offset)."""
        cfg = self.broker.config
        limit = cfg.max_batch_records if credit is None else min(credit, cfg.max_batch_records)
        key = (actor.meta.epoch if actor.meta is not None else 0, offset, sub.mask)
        fan = sub.fanout
        hit = fan.frames.get(key)
        if hit is not None and hit[1] <= limit:
            return hit
        batch = actor.read(offset, cfg.max_batch_records, cfg.max_batch_bytes)
        built: tuple[bytes | None, int, int] = _core.pack_data(fan.prefix, batch, sub.mask,
                                                                limit)
        if limit == cfg.max_batch_records and (built[0] is None
                                               or len(built[0]) <= _CACHE_MAX_FRAME):
            fan.put(key, built)
        return built

    def _direct(self, sub: _Sub) -> bool:
        """The fast path of fan-out, called by the session's watcher while this
        connection's writer is idle and has nothing queued: if ``sub`` is at
        the tail with nothing but one data frame to send, send it with one
        non-blocking ``send`` right here, with no task switch.  False leaves
        the subscription to the writer (anything unusual: an event, a
        catch-up, no credit, a full socket)."""
        cursor = sub.cursor
        if cursor is None or self._sock is None or sub.behind or self.closing is not None:
            return False
        actor = cursor.actor
        meta = actor.meta if actor is not None else None
        if (actor is None or actor.exited or meta is None or meta.epoch != cursor.epoch
                or meta.closed or sub.credit == 0 or self.subs.get(sub.name) is not sub):
            return False
        committed, offset = actor.committed, cursor.offset
        if offset >= committed:
            return True                   # nothing new for this one
        try:
            frame, count, nxt = self._frame_at(sub, actor, offset, sub.credit)
        except BrokerError:
            return False
        if nxt < committed:
            return False                  # more than one frame behind: the writer's job
        if frame is not None:
            try:
                n = self._try_send(frame)
            except trio.BrokenResourceError:
                return False              # the writer meets the error and ends the connection
            if n == 0:
                return False
            if n < len(frame):
                self.send(frame[n:])      # the rest goes first in the writer's next round
        self._advance(sub, actor, nxt, count)
        return True

    @staticmethod
    def _advance(sub: _Sub, actor: SessionActor, nxt: int, count: int) -> None:
        """``count`` records up to ``nxt`` were handed over to this subscriber."""
        assert sub.cursor is not None
        sub.cursor.offset = nxt
        actor.touch()                     # a reader's use keeps a sliding TTL alive
        if sub.credit is not None:
            sub.credit -= count

    def _event(self, sub: _Sub, chunks: list[bytes], event: str,
               epoch: int | None = None) -> int:
        frame = _frame(_frames.Event(sub.name, event, epoch))
        chunks.append(frame)
        self._end(sub)
        return len(frame)

    def _end(self, sub: _Sub) -> None:
        if self.subs.get(sub.name) is sub:
            del self.subs[sub.name]
            self.server._unfan(sub.name)
        self.ready.pop(sub, None)
        if sub.cursor is not None:
            sub.cursor.close()
            sub.cursor = None
        if sub.member or sub.feed is not None:
            self._hide(sub)

    # ------------------------------------------------------------ presence
    #
    # A subscription is a member of its session's presence from ``attached``
    # to ``_end``, which every way a subscription ends goes through (detach,
    # events, errors, refresh, and ``release`` when the connection ends for
    # any reason).  A subscription that asked for presence watches the
    # registry through its Feed; the writer turns the feed into frames once
    # per round, so a peer that does not read holds at most a feed's worth.

    def _show(self, sub: _Sub, frame: _frames.Attach) -> None:
        """Make a subscription just attached a member, and a watcher if asked."""
        if self.subs.get(sub.name) is not sub:
            return                  # ended while attaching: nothing to undo later
        presence = self.broker.presence
        if not frame.hidden:
            assert self.client is not None
            presence.join(sub.name, _frames.Member(
                self.id, self.client, "ws", time.time_ns() // 1000,
                frame.info if frame.info is not None else self.info))
            sub.member = True
        if frame.presence:
            sub.feed = Feed()       # starts with the whole set due
            presence.watch(sub.name, sub.presence_changed)
            self.presence_due[sub] = None
            self.wake.set()

    def _hide(self, sub: _Sub) -> None:
        presence = self.broker.presence
        if sub.feed is not None:
            presence.unwatch(sub.name, sub.presence_changed)
            sub.feed = None
            self.presence_due.pop(sub, None)
        if sub.member:
            sub.member = False
            presence.leave(sub.name, self.id)

    def _presence(self, chunks: list[bytes]) -> None:
        """Add the presence frames due to ``chunks``: the whole set, or the
        net changes since the last round."""
        due, self.presence_due = self.presence_due, {}
        presence = self.broker.presence
        for sub in due:
            feed = sub.feed
            if feed is None or self.subs.get(sub.name) is not sub:
                continue
            resync, changes = feed.take()
            if resync:
                chunks.append(_frame(_frames.Members(sub.name,
                                                     tuple(presence.members(sub.name)))))
            for kind, member in changes:
                if kind == JOIN:
                    chunks.append(_frame(_frames.Join(sub.name, member)))
                else:
                    chunks.append(_frame(_frames.Leave(sub.name, member)))

    # ------------------------------------------------------------ frames in

    async def _on_message(self, payload: bytes) -> None:
        try:
            frame = _frames.decode(payload)
        except _frames.FrameError as exc:
            self.error(exc.code, exc.message, exc.session, exc.request_id)
            return
        if self.client is None:
            if isinstance(frame, _frames.Hello):
                self._hello(frame)
            else:
                self.error("hello_required", "the first frame must be hello")
                self.close(CLOSE_HELLO, "hello required")
            return
        handler = self._handlers.get(type(frame))
        if handler is None:
            self.error("bad_frame", f"a client cannot send {type(frame).__name__.lower()}")
            return
        await handler(self, frame)

    def _hello(self, frame: _frames.Hello) -> None:
        auth = self.server.auth
        try:
            principal = auth.verify(frame.token or self.url_token)
        except AuthError as exc:
            self.error(exc.code, exc.message)
            self.close(CLOSE_AUTH, exc.code)
            return
        if auth.enabled:
            assert principal.sub is not None
            if frame.client is not None and frame.client != principal.sub:
                self.error("client_mismatch", f"hello client {frame.client!r} is not the "
                           "token's sub: leave client out, or send the sub")
                self.close(CLOSE_AUTH, "client_mismatch")
                return
            self.client = principal.sub
        else:
            self.client = frame.client or f"anon-{self.id}"
        self.info = frame.info
        ttl = self._take(principal)
        self.send(_frame(_frames.Welcome(1, self.client, self.id, self.cfg.heartbeat_s,
                                         self.cfg.max_message, ttl)))

    def _take(self, principal: Principal) -> float | None:
        """Make ``principal`` the connection's and set its expiry timer;
        the seconds it has left (None if it never expires)."""
        self.principal = principal
        left = principal.seconds_left(self.server.auth.clock())
        if left == math.inf:
            self.expires_at = self.warn_at = self.deadline = math.inf
        else:
            left = max(left, 0.0)
            self.expires_at = trio.current_time() + left
            # Warn shortly before expiry, but not at once for a short-lived token.
            self.warn_at = self.expires_at - min(self.cfg.expiry_warning_s, left / 2)
            self.deadline = self.warn_at
            self.wake.set()          # the writer may be sleeping towards a later deadline
        if self.sending is not None and self.closing is None:
            self.sending.deadline = self._cutoff()
        return None if left == math.inf else left

    def _on_deadline(self) -> None:
        """The writer's timer went off: the hello timeout, the expiry
        warning or the expiry itself."""
        now = trio.current_time()
        if self.closing is not None:
            return
        if self.client is None:
            self.error("hello_timeout", f"no hello within {self.cfg.hello_timeout_s:g} s")
            self.close(CLOSE_HELLO_TIMEOUT, "hello timeout")
            self.deadline = math.inf
        elif now >= self.expires_at:
            self.error("token_expired", "the token has expired: connect again with a new one")
            self.close(CLOSE_AUTH, "token expired")
            self.deadline = math.inf
        else:
            if now >= self.warn_at:
                self.send(_frame(_frames.Expiring(self.expires_at - now)))
                self.warn_at = math.inf
            self.deadline = min(self.warn_at, self.expires_at)

    def _allowed(self, name: str, request_id: int, *operations: str) -> bool:
        """Whether the token allows ``operations`` on ``name``; if not, the
        refusal is sent.  Asked before the session is looked up."""
        if len(name) > MAX_NAME_BYTES:
            # Never match a capability glob against a name that cannot be
            # valid: a glob's cost grows with the length of the name, which
            # here only the message size bounds.
            try:
                check_name(name)
            except InvalidSessionName as exc:
                self.error(exc.code, str(exc), name, request_id)
                return False
        try:
            for operation in operations:
                self.principal.check(name, operation)
        except Forbidden as exc:
            self.error(exc.code, exc.message, exc.session, request_id)
            return False
        return True

    async def _on_hello(self, frame: _frames.Hello) -> None:
        self.error("bad_frame", "hello was already sent")
        self.close(CLOSE_HELLO, "hello repeated")

    async def _on_refresh(self, frame: _frames.Refresh) -> None:
        try:
            principal = self.server.auth.verify(frame.token)
        except AuthError as exc:
            # The current token still holds until it expires: the client may try again.
            self.error(exc.code, exc.message, None, frame.id)
            return
        if self.server.auth.enabled and principal.sub != self.client:
            self.error("client_mismatch", "a refresh must carry a token for the same sub "
                       f"({self.client!r}), not {principal.sub!r}", None, frame.id)
            self.close(CLOSE_AUTH, "client_mismatch")
            return
        for sub in list(self.subs.values()):
            if not principal.allows(sub.name, READ):
                self._end(sub)
                self.error(Forbidden.code, Forbidden(READ, sub.name).message
                           + ": the subscription has ended", sub.name)
        self.send(_frame(_frames.Refreshed(frame.id, self._take(principal))))

    async def _on_attach(self, frame: _frames.Attach) -> None:
        name = frame.session
        if not self._allowed(name, frame.id, *((READ, CREATE) if frame.create else (READ,))):
            return
        if frame.view and not self._view_possible(frame):
            return
        if name in self.subs:
            self.error("already_attached", f"already attached to {name!r}", name, frame.id)
            return
        if len(self.subs) >= self.cfg.max_sessions:
            self.error("too_many_sessions", f"at most {self.cfg.max_sessions} sessions attached "
                       "at once on one connection: detach one first", name, frame.id)
            return
        mask = _core.ALL_KINDS if frame.kinds is None else sum(1 << k for k in set(frame.kinds))
        sub = _Sub(self, name, mask, frame.credit, self.server._fanout(name))
        self.subs[name] = sub
        try:
            try:
                cursor = await self.broker.open_subscription(
                    name, frame.offset, epoch=frame.epoch, watch=sub.mark)
            except SessionNotFound:
                if frame.epoch is not None:
                    self._event(sub, self.out, "deleted")
                    self.wake.set()
                    return
                if not frame.create:
                    raise
                await self.broker.create(name)
                cursor = await self.broker.open_subscription(name, frame.offset,
                                                             watch=sub.mark)
        except EpochChanged as exc:
            self._event(sub, self.out, "epoch_changed", exc.actual)
            self.wake.set()
            return
        except BrokerError as exc:
            self._end(sub)
            self.error(exc.code, str(exc), name, frame.id)
            return
        if self.subs.get(name) is not sub:
            cursor.close()          # the connection ended meanwhile
            return
        view = await self._view(sub, cursor, frame.id) if frame.view else None
        if frame.view and view is None:
            return
        sub.cursor = cursor
        actor = await cursor.live_actor()
        meta = actor.meta
        self.send(_frame(_frames.Attached(frame.id, name, cursor.epoch, cursor.offset,
                                          actor.committed,
                                          bool(meta is not None and meta.closed))))
        if view is not None:
            self.send(view)
        self._show(sub, frame)
        sub.mark()

    def _view_possible(self, frame: _frames.Attach) -> bool:
        """Whether an attach with ``view`` can be exact; if not, the refusal is sent."""
        if frame.offset != NOW:
            self.error("bad_view", "an attach with a view reads from where the view ends: "
                       "leave offset out", frame.session, frame.id)
            return False
        if frame.kinds is not None and not _VIEW_KINDS <= set(frame.kinds):
            self.error("bad_view", "an attach with a view needs every kind the view folds "
                       "(1-7) in kinds, or no kinds at all", frame.session, frame.id)
            return False
        return True

    async def _view(self, sub: _Sub, cursor: Subscription, request_id: int) -> bytes | None:
        """The ``view`` frame of an attach, with ``cursor`` moved to where the
        view is exact; None if the attach ended instead (already answered).

        The cursor was opened at the end, before the view was folded: it
        holds the actor, and the view, folded later, is exact at or past it."""
        try:
            view = await self.broker.view(sub.name)
        except BrokerError as exc:
            cursor.close()
            self._end(sub)
            self.error(exc.code, str(exc), sub.name, request_id)
            return None
        if self.subs.get(sub.name) is not sub:
            cursor.close()          # the connection ended meanwhile
            return None
        if view.epoch != cursor.epoch:
            cursor.close()          # deleted and created again meanwhile
            self._event(sub, self.out, "epoch_changed", view.epoch)
            self.wake.set()
            return None
        cursor.offset = view.next
        return _frame(_frames.View(sub.name, view.next, view.snapshot))

    async def _on_detach(self, frame: _frames.Detach) -> None:
        sub = self.subs.get(frame.session)
        if sub is None:
            self.error("not_attached", f"not attached to {frame.session!r}", frame.session,
                       frame.id)
            return
        self._end(sub)
        self.send(_frame(_frames.Detached(frame.id, frame.session)))

    async def _on_credit(self, frame: _frames.Credit) -> None:
        sub = self.subs.get(frame.session)
        if sub is None:
            self.error("not_attached", f"not attached to {frame.session!r}", frame.session)
            return
        if sub.credit is not None:
            sub.credit += frame.n
            sub.mark()

    async def _on_publish(self, frame: _frames.Publish) -> None:
        # Records of kind 1 are signals, whichever frame carries them: a
        # token without ``signal`` must not cancel or approve through publish.
        operation = SIGNAL_OP if frame.kind == SIGNAL else APPEND
        if not self._allowed(frame.session, frame.id,
                             *((operation, CREATE) if frame.create else (operation,))):
            return
        metas = frame.meta
        producer = frame.producer
        await self._publish(frame.id, frame.session, frame.records, frame.kind, metas,
                            None if producer is None
                            else (producer.id, producer.epoch, producer.seq),
                            frame.create)

    async def _on_signal(self, frame: _frames.Signal) -> None:
        if not self._allowed(frame.session, frame.id, SIGNAL_OP):
            return
        await self._publish(frame.id, frame.session, (frame.payload,), SIGNAL,
                            None if frame.meta is None else (frame.meta,), None, False)

    async def _publish(self, request_id: int, name: str, records: tuple[bytes, ...],
                       kind: int, metas: tuple[Any, ...] | None,
                       producer: tuple[str, int, int] | None, create: bool) -> None:
        if len(records) > self.cfg.max_publish_records:
            self.error("batch_too_large", f"at most {self.cfg.max_publish_records} records "
                       f"per publish, not {len(records)}", name, request_id)
            return
        if self._over_rate(request_id, name, len(records)):
            return
        try:
            try:
                info = await self.broker.info(name)
            except SessionNotFound:
                if not create:
                    raise
                info, _ = await self.broker.create(name)
            if media_type(info.content_type) == "application/json" \
                    and not all(map(is_json_text, records)):
                self.error("bad_payload", "this session holds JSON: every payload "
                           "must be one JSON value in UTF-8", name, request_id)
                return
            on_done: Callable[[Reply], None] = (
                lambda reply: self.send(_ack_frame(request_id, name, reply)))
            await self.broker.submit_publish(name, records, kind=kind, publisher=self.client,
                                             metas=metas, producer=producer, on_done=on_done)
        except BrokerError as exc:
            self.error(exc.code, str(exc), name, request_id)

    def _over_rate(self, request_id: int, name: str, n: int) -> bool:
        """Take ``n`` records from the bucket (always there with no rate), or
        refuse the publish."""
        wait = self.bucket.take(n)
        if not wait:
            return False
        rate, burst = self.cfg.publish_rate, self.bucket.burst
        if wait == math.inf:
            self.error("batch_too_large", f"{n} records in one publish can never pass this "
                       f"connection's publish burst of {burst:g} records: split it",
                       name, request_id)
        else:
            self.send(_frame(_frames.Error(
                "rate_limited", f"over {rate:g} records per second on this connection: "
                f"nothing was stored; retry in {wait:.3g} s", name, request_id, wait)))
        return True

    async def _on_ping(self, frame: _frames.Ping) -> None:
        self.send(_frame(_frames.Pong(frame.id)))

    async def _on_pong(self, frame: _frames.Pong) -> None:
        self.awaiting_pong = False

    async def _on_presence(self, frame: _frames.Presence) -> None:
        name = frame.session
        if not self._allowed(name, frame.id, READ):
            return
        try:
            await self.broker.info(name)        # a session that does not exist has no members
        except BrokerError as exc:
            self.error(exc.code, str(exc), name, frame.id)
            return
        self.send(_frame(_frames.Members(name, tuple(self.broker.presence.members(name)),
                                         frame.id)))

    _handlers: dict[type, Callable[[_Conn, Any], Any]] = {
        _frames.Hello: _on_hello,
        _frames.Attach: _on_attach,
        _frames.Detach: _on_detach,
        _frames.Credit: _on_credit,
        _frames.Refresh: _on_refresh,
        _frames.Publish: _on_publish,
        _frames.Signal: _on_signal,
        _frames.Ping: _on_ping,
        _frames.Pong: _on_pong,
        _frames.Presence: _on_presence,
    }
