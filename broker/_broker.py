"""The broker: a registry of session actors inside one Trio nursery.

Theory of operation
-------------------
``open_broker(data_dir)`` opens a nursery and yields a Broker.  The broker
starts a session's actor lazily, the first time the session is used, and forgets
it when the actor exits (idle, deleted, or on shutdown).  Every write goes to
the actor's mailbox; every read goes straight to the actor's published state
(see _session.py).  On leaving the ``async with``, each actor's mailbox is
closed: it finishes the commands already queued, syncs, closes its files and
exits, and the nursery closes.

On disk::

    data_dir/
      LOCK               held with flock while a broker has the directory open
      broker.json        the epoch ceiling, this run, the runs a machine crash cut short
      sessions/<name>/   one directory per session (names escaped, see _meta.py)

``broker.json`` (see _run.py) hands out epochs, so a session deleted and
created again under the same name never reuses one, and numbers the broker's
runs, so that a session whose unsynced records a machine crash may have taken
back is given a new epoch.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from . import _core
from ._config import BrokerConfig
from ._errors import (
    BrokerClosed,
    BrokerError,
    EpochChanged,
    OffsetOutOfRange,
    OffsetTooOld,
    SessionDeleted,
)
from ._files import FileCache
from ._meta import check_name, dir_name
from ._presence import Registry
from ._run import BrokerState, current_boot_id
from ._session import MESSAGE, START, ProduceResult, Publish, Reply, SessionActor, SessionInfo
from ._session import ConversationView

__all__ = ["Broker", "Subscription", "open_broker"]

def _stamped(publisher: str | None) -> Publish | None:
    """How plain appends carry a publisher in their headers, if they have one."""
    return None if publisher is None else Publish(MESSAGE, publisher)


class Broker:
    """A broker on one data directory. Make it with ``open_broker``."""

    def __init__(self, data_dir: str, config: BrokerConfig, nursery: trio.Nursery) -> None:
        self.data_dir = os.path.abspath(data_dir)
        self.config = config
        self._nursery = nursery
        self._sessions_dir = os.path.join(self.data_dir, "sessions")
        self._files = FileCache(config.max_open_files)
        self._actors: dict[str, SessionActor] = {}
        self._closed = False
        self.state = BrokerState(os.path.join(self.data_dir, "broker.json"),
                                 config.fsync.durable, current_boot_id())
        # Who is attached to each session now (docs/protocol.md, "Presence"):
        # kept by the transports, in memory only, never in a log.
        self.presence = Registry()

    # ------------------------------------------------------------- actors

    @property
    def active_sessions(self) -> int:
        """Sessions with a live actor right now."""
        return len(self._actors)

    @property
    def open_files(self) -> int:
        """Descriptors held by the broker's file cache."""
        return len(self._files)

    def _forget(self, actor: SessionActor) -> None:
        if self._actors.get(actor.name) is actor:
            del self._actors[actor.name]

    async def _actor(self, name: str) -> SessionActor:
        if self._closed:
            raise BrokerClosed()
        actor = self._actors.get(name)
        if actor is None:
            check_name(name)
            actor = SessionActor(name, os.path.join(self._sessions_dir, dir_name(name)),
                                 self._files, self.config, self.state, self._forget)
            self._actors[name] = actor
            await self._nursery.start(actor.run)
        else:
            await actor.ready.wait()
            if actor.start_error is not None:
                raise actor.start_error
        return actor

    async def _call(self, name: str, kind: str, arg: Any = None) -> Any:
        while True:
            actor = await self._actor(name)
            try:
                return await actor.call(kind, arg)
            except trio.ClosedResourceError:
                continue    # the actor exited between lookup and send: use a new one

    # ----------------------------------------------------------- sessions

    async def create(self, name: str, *, content_type: str = "application/octet-stream",
                     ttl_s: float | None = None, expires_at: float | None = None,
                     extra: dict[str, Any] | None = None, closed: bool = False,
                     initial: Sequence[bytes] = (), publisher: str | None = None,
                     copied: int = 0) -> tuple[SessionInfo, bool]:
        """Create a session; return (info, created).

        ``initial`` records are appended, and ``closed`` applied, as part of
        the create.  Creating a session that exists with the same media type,
        TTL, expiry and closed state returns it with ``created`` False (and
        appends nothing); any difference raises SessionExists.  ``ttl_s`` is a
        sliding window: the session expires ``ttl_s`` after its last use.
        ``publisher`` is stamped on the initial records, except the first
        ``copied`` (a fork's copy of its source, which this caller did not write).
        """
        result: tuple[SessionInfo, bool] = await self._call(name, "create", {
            "content_type": content_type, "ttl_s": ttl_s, "expires_at": expires_at,
            "extra": extra or {}, "closed": closed, "initial": list(initial),
            "pub": _stamped(publisher),
            "copied": copied})
        return result

    async def append(self, name: str, payload: bytes) -> int:
        """Append one record; return its offset once durable per the fsync policy."""
        offsets: range = await self._call(name, "append", (payload,))
        return offsets.start

    async def append_many(self, name: str, payloads: Sequence[bytes], *,
                          seq: str | None = None, publisher: str | None = None) -> range:
        """Append records atomically as one run of consecutive offsets.

        With ``seq`` (writer coordination, Durable Streams' Stream-Seq), the
        append is refused with SequenceConflict unless ``seq`` sorts after the
        last one accepted on this session.  ``publisher`` goes in each
        record's header, as ``publish`` puts it.
        """
        pub = _stamped(publisher)
        if seq is not None:
            offsets: range = await self._call(name, "append_seq", (list(payloads), seq, pub))
        elif pub is not None:
            offsets = await self._call(name, "publish", (list(payloads), pub, None))
        else:
            offsets = await self._call(name, "append", list(payloads))
        return offsets

    async def publish(self, name: str, payloads: Sequence[bytes], *, kind: int = MESSAGE,
                      publisher: str | None = None, metas: Sequence[Any] | None = None,
                      producer: tuple[str, int, int] | None = None) -> range | ProduceResult:
        """Append records with headers (docs/protocol.md, "Records").

        ``kind`` (0-63) is stored with every record, ``publisher`` and the
        per-record application ``metas`` in each record's header.  Without
        ``producer`` this answers the range of offsets; with ``(id, epoch,
        seq)`` it is an idempotent producer's append and answers a
        ProduceResult, as ``produce`` does.
        """
        reply = await self.submit_publish(name, payloads, kind=kind, publisher=publisher,
                                          metas=metas, producer=producer)
        result: range | ProduceResult = await reply.wait()
        return result

    async def submit_publish(self, name: str, payloads: Sequence[bytes], *,
                             kind: int = MESSAGE, publisher: str | None = None,
                             metas: Sequence[Any] | None = None,
                             producer: tuple[str, int, int] | None = None,
                             on_done: Callable[[Reply], None] | None = None) -> Reply:
        """``publish`` without waiting for the answer: returns once the append
        is queued (which waits only while the session's mailbox is full), so a
        publisher can pipeline.  The Reply is answered in queue order; if it
        fails with trio.ClosedResourceError the session restarted before
        taking it, and the publish may be retried."""
        if metas is not None and len(metas) != len(payloads):
            raise ValueError("metas must have one entry per payload")
        pub = Publish(kind, publisher, metas)
        while True:
            actor = await self._actor(name)
            reply = Reply(on_done)
            try:
                await actor.send("publish", (list(payloads), pub, producer), reply)
                return reply
            except trio.ClosedResourceError:
                continue

    async def _live(self, name: str) -> SessionActor:
        """The session's actor, after applying expiry (an expired session is
        deleted and reads as not found)."""
        actor = await self._actor(name)
        if actor.expired():
            await self._call(name, "expire")
            actor = await self._actor(name)
        return actor

    async def produce(self, name: str, payloads: Sequence[bytes], *, producer: str,
                      epoch: int, seq: int, close: bool = False,
                      publisher: str | None = None) -> ProduceResult:
        """An idempotent producer's append (Kafka-style exactly-once retries).

        ``(producer, epoch, seq)`` is checked against the producer's last
        accepted append: a retry of it is answered ``duplicate`` without
        appending again; see ProduceResult for the refusals.  ``close`` closes
        the session after the records (with no records: a close that takes
        part in the producer's sequence).  The producer table survives
        restarts: it is rebuilt from stamps in the log.  ``publisher`` goes in
        each record's header next to the stamp.
        """
        pub = _stamped(publisher)
        result: ProduceResult = await self._call(
            name, "produce", (list(payloads), producer, epoch, seq, close, pub))
        return result

    async def info(self, name: str, *, touch: bool = False) -> SessionInfo:
        """Metadata and offsets. ``touch`` counts as a use for the sliding TTL."""
        actor = await self._live(name)
        if touch:
            actor.touch()
        return actor.info()

    async def sync(self, name: str) -> None:
        """Make every append to ``name`` so far durable now, without waiting for
        the group-commit window, and acknowledge them."""
        await self._call(name, "sync")

    async def close_session(self, name: str) -> SessionInfo:
        """Refuse further appends; readers finish once they reach the end."""
        info: SessionInfo = await self._call(name, "close")
        return info

    async def delete(self, name: str) -> None:
        """Remove the session and its files. Its readers get SessionDeleted."""
        await self._call(name, "delete")

    async def set_extra(self, name: str, changes: dict[str, Any]) -> SessionInfo:
        """Merge ``changes`` into the session's durable ``extra`` metadata."""
        info: SessionInfo = await self._call(name, "set_extra", changes)
        return info

    async def view(self, name: str, *, text: bool = False) -> ConversationView:
        """The session's AI conversation (docs/ai.md, "Views"), exact at the
        records visible now: its ``next``.  Folded on demand, from where the
        previous view (or the saved snapshot) stopped.  ``text`` asks for the
        snapshot's JSON-safe form."""
        view: ConversationView = await self._call(name, "view", text)
        return view

    async def read(self, name: str, offset: int = START, *, max_records: int | None = None,
                   max_bytes: int | None = None) -> _core.Batch:
        """Durable records from ``offset`` (or START, NOW); empty at the end."""
        actor = await self._live(name)
        actor.touch()
        return actor.read(actor.resolve(offset), max_records or self.config.max_batch_records,
                          max_bytes or self.config.max_batch_bytes)

    @asynccontextmanager
    async def subscribe(self, name: str, offset: int = START, *,
                        epoch: int | None = None) -> AsyncIterator[Subscription]:
        """A cursor on the session from ``offset``: see Subscription."""
        sub = await self.open_subscription(name, offset, epoch=epoch)
        try:
            yield sub
        finally:
            sub.close()

    async def open_subscription(self, name: str, offset: int = START, *,
                                epoch: int | None = None,
                                watch: Callable[[], None] | None = None) -> Subscription:
        """``subscribe`` for callers that manage the lifetime: call ``close()``.

        ``watch`` is called (on the session's task, so it must not block)
        whenever the session may have something new for the cursor.
        """
        actor = await self._live(name)
        actor.touch()
        info = actor.info()
        if epoch is not None and epoch != info.epoch:
            raise EpochChanged(name, epoch, info.epoch)
        start = actor.resolve(offset)
        log = actor.log
        if log is not None and start < log.start_offset:
            raise OffsetTooOld(start, log.start_offset)
        if start > actor.committed:
            raise OffsetOutOfRange(start, actor.committed)
        return Subscription(self, actor, start, info.epoch, watch)

    async def follow(self, name: str, offset: int = START) -> AsyncIterator[_core.Batch]:
        """Every batch from ``offset`` on, live; ends when the session is closed."""
        async with self.subscribe(name, offset) as sub:
            async for batch in sub:
                yield batch

    def _shutdown(self) -> None:
        self._closed = True
        self.presence.close()
        for actor in list(self._actors.values()):
            actor._send.close()


class Subscription:
    """A reader's cursor: an offset and a wait, never a queue.

    ``next()`` returns the next batch after ``offset`` and advances it.  At the
    end of the session it waits for more, unless ``wait=False``.  Iterating
    yields batches until the session is closed and fully read.
    """

    def __init__(self, broker: Broker, actor: SessionActor, offset: int, epoch: int,
                 watch: Callable[[], None] | None = None) -> None:
        self.name = actor.name
        self.offset = offset            # next offset to read
        self.epoch = epoch              # the incarnation this cursor belongs to
        self._broker = broker
        self._watch = watch
        self._actor: SessionActor | None = None
        self._hold(actor)

    def _hold(self, actor: SessionActor) -> None:
        actor.readers += 1
        if self._watch is not None:
            actor.watchers.add(self._watch)
        self._actor = actor

    def close(self) -> None:
        """Let go of the session (its actor may then be reaped when idle)."""
        if self._actor is not None:
            self._actor.readers -= 1
            if self._watch is not None:
                self._actor.watchers.discard(self._watch)
            self._actor = None

    @property
    def actor(self) -> SessionActor | None:
        """The actor this cursor reads from now (None once closed)."""
        return self._actor

    async def live_actor(self) -> SessionActor:
        """The session's actor, starting a new one if the old one exited."""
        actor = self._actor
        if actor is not None and not actor.exited:
            return actor
        self.close()
        actor = await self._broker._actor(self.name)
        self._hold(actor)
        return actor

    def check(self, actor: SessionActor) -> None:
        """Raise SessionDeleted or EpochChanged if the session is no longer
        the one this cursor started on."""
        meta = actor.meta
        if meta is None:
            raise SessionDeleted(self.name)
        if meta.epoch != self.epoch:
            raise EpochChanged(self.name, self.epoch, meta.epoch)

    @property
    def up_to_date(self) -> bool:
        """True when the cursor has read everything durable so far."""
        return self._actor is not None and self.offset >= self._actor.committed

    @property
    def finished(self) -> bool:
        """True when the session is closed and the cursor has read all of it."""
        a = self._actor
        return (a is not None and a.meta is not None and a.meta.closed
                and self.offset >= a.committed)

    async def next(self, *, max_records: int | None = None, max_bytes: int | None = None,
                   wait: bool = True) -> _core.Batch:
        cfg = self._broker.config
        while True:
            actor = await self.live_actor()
            self.check(actor)
            actor.touch()
            changed = actor.changed
            batch = actor.read(self.offset, max_records or cfg.max_batch_records,
                               max_bytes or cfg.max_batch_bytes)
            if batch:
                self.offset = batch.next_offset
                return batch
            if not wait or self.finished:
                return batch
            await changed.wait()

    async def wait(self) -> None:
        """Return once there is something past ``offset`` (or the session was
        closed or deleted), without reading it."""
        actor = await self.live_actor()
        self.check(actor)
        if actor.committed > self.offset or self.finished:
            return
        await actor.changed.wait()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> _core.Batch:
        batch = await self.next()
        if not batch:
            raise StopAsyncIteration
        return batch


@asynccontextmanager
async def open_broker(data_dir: str | os.PathLike[str], config: BrokerConfig | None = None,
                      **overrides: Any) -> AsyncIterator[Broker]:
    """Open a broker on ``data_dir`` for the duration of the ``async with``."""
    cfg = config or BrokerConfig()
    if overrides:
        cfg = cfg.replace(**overrides)
    path = os.fspath(data_dir)
    os.makedirs(os.path.join(path, "sessions"), exist_ok=True)
    lock_fd = os.open(os.path.join(path, "LOCK"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BrokerError(f"{path} is in use by another broker") from None
        async with trio.open_nursery() as nursery:
            broker = Broker(path, cfg, nursery)
            nursery.start_soon(broker.presence.run)    # long-poll readers' linger
            try:
                yield broker
            finally:
                broker._shutdown()
        broker._files.close_all()
        broker.state.close()
    finally:
        os.close(lock_fd)
