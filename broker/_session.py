"""Session actors: the single writer of each session.

Theory of operation
-------------------
Every session that is in use has one actor, a Trio task in the broker's
nursery.  It alone touches the session's files and metadata, assigns offsets,
and decides when appended records become visible.  Other tasks reach it in two
ways:

* **Commands** (create, append, close, delete) go through its bounded mailbox
  and are answered through a one-shot reply.  A full mailbox makes senders wait:
  that, and the time an fsync takes, is the only backpressure a publisher feels.

* **Reads** do not queue.  The actor *publishes* its state: ``committed`` (the
  offset below which every record may be read), the ring of
  recent records, and the segment log.  A reader calls ``read`` synchronously,
  which serves from the ring if the offset is still there and from disk if not,
  and never blocks the actor.  A reader at the tail waits on ``changed``, an
  event the actor sets and replaces whenever ``committed`` moves or the session
  is closed or deleted.  A reader is an offset and a wait: no queue, so memory
  does not grow with the number of readers or with how far behind they are.

The actor's loop takes one command, then every command already waiting, and
writes all the appends among them with one system call.  Then, per the fsync
policy, it fsyncs in a worker thread (appends that arrive meanwhile wait in
the mailbox and form the next group), moves ``durable`` forward and answers the
appends.  Readers see a record from the moment it is written (``committed``
moves with each write, and the readers are woken), unless
``BrokerConfig.deliver`` is "durable" or the machine's boot id is unknown; then
``committed`` waits for ``durable``.  A record shown before its fsync survives a
process crash (the page cache keeps it); a machine crash may take it back, and
then the session gets a new epoch when it is next opened (_run.py), so no reader
silently reads different records at offsets it has.  The actor writes the run
into meta.json, durably, before it first shows an unsynced record in a run.

An actor with no work and no readers for ``idle_timeout_s`` syncs, closes its
files and exits; the next use of the session starts a new one.

Conversation views (docs/ai.md, "Views") cost nothing to a session never
viewed.  The actor keeps no fold until a ``view`` command asks for one (or
it opens a session that has a ``convo.snap``, one viewed before); it then
loads ``convo.snap`` (if it is of this epoch and covers no more than the log
held when the actor opened it) or starts at the log's start, folds the
committed records past where it stopped, a chunk at a time, and answers a
snapshot exact at ``committed``.  From then on each turn of the actor's loop
folds what became readable since (``_keep_folding``), so the fold follows
the records and a view reads little.  It is saved to ``convo.snap`` when it
has moved ``_CONVO_SAVE_RECORDS`` past the last save, and on exit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import trio

from . import _core
from ._config import BrokerConfig
from ._convo import Conversation
from ._errors import (
    BrokerError,
    OffsetOutOfRange,
    OffsetTooOld,
    RecordTooLarge,
    SequenceConflict,
    SessionClosed,
    SessionExists,
    SessionNotFound,
    StorageError,
)
from ._files import FileCache, fsync_dir, write_atomic
from ._log import SegmentLog, fsync_all
from ._meta import META_FILE, SessionMeta, load_meta, media_type
from ._run import BrokerState

logger = logging.getLogger("broker.session")

# Offsets a reader may pass instead of a number.
START = -1   # the oldest record still retained
NOW = -2     # the current end: only records appended from now on

# Record kinds (stored in bits 8-13 of a record's flags; docs/protocol.md).
MESSAGE = 0
SIGNAL = 1
MAX_KIND = 63
# Flag bit 7 (one of the reserved bits 4-7): the first record of an idempotent
# producer's append.  Its last record carries the stamp, so recovery knows
# where the whole append landed.  Readers never see it: they are shown the
# kind bits only.
APPEND_START = 1 << 7


def record_header(publisher: str | None, meta: Any = None,
                  stamp: tuple[str, int, int] | None = None) -> bytes | None:
    """A record's stored header: msgpack ``[publisher, meta, stamp]`` with
    trailing nils left out, or None when all three are absent."""
    fields: list[Any] = [publisher, meta, list(stamp) if stamp is not None else None]
    while fields and fields[-1] is None:
        fields.pop()
    return msgpack.packb(fields) if fields else None


def producer_key(publisher: str | None, producer: str) -> str:
    """Where an idempotent producer's (epoch, seq) is kept.  With auth on,
    records carry their publisher (the token's sub), and a producer id is
    the publisher's own: another client naming the same id gets a fresh
    producer rather than the power to fence or skip the first one's appends.
    Without a publisher the id alone is the key, as the Durable Streams
    protocol has it."""
    return producer if publisher is None else json.dumps([publisher, producer])


def header_parts(header: bytes) -> tuple[str | None, Any, tuple[str, int, int] | None]:
    """The publisher, the application meta and the idempotent-producer stamp
    in a stored header.  Meta is any msgpack value, maps with keys of any
    type included."""
    fields = msgpack.unpackb(header, strict_map_key=False)
    if not isinstance(fields, list):
        return None, None, None
    publisher = fields[0] if fields and isinstance(fields[0], str) else None
    meta = fields[1] if len(fields) > 1 else None
    if len(fields) > 2 and fields[2] is not None:
        producer, epoch, seq = fields[2]
        return publisher, meta, (producer, epoch, seq)
    return publisher, meta, None


def header_stamp(header: bytes) -> tuple[str, int, int] | None:
    """The idempotent-producer stamp in a stored header, if any."""
    return header_parts(header)[2]


@dataclass(frozen=True, slots=True)
class Publish:
    """What a publisher adds to each record besides its payload."""

    kind: int = MESSAGE
    publisher: str | None = None
    metas: Sequence[Any] | None = None    # application meta per record (None: none)

    def __post_init__(self) -> None:
        if not 0 <= self.kind <= MAX_KIND:
            raise ValueError(f"record kind must be 0..{MAX_KIND}, not {self.kind}")


_PLAIN = Publish()      # a record with no kind, publisher or meta of its own


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A snapshot of a session's metadata and offsets."""

    name: str
    epoch: int
    content_type: str
    created_at: float
    ttl_s: float | None
    expires_at: float | None
    closed: bool
    start_offset: int        # oldest retained offset
    next_offset: int         # offset the next record will get (everything below is durable)
    extra: dict[str, Any]


_LANDED_PER_PRODUCER = 64     # recent appends remembered per producer
_LANDED_PRODUCERS = 1024      # producers remembered per session
# On open, the records before the producer snapshot that are read back for
# where appends landed (SessionActor._tail): at most this many, with at most
# this much payload, in chunks of up to this many records.
_LANDED_TAIL_RECORDS = 4096
_LANDED_TAIL_BYTES = 4 << 20
_LANDED_TAIL_CHUNK = 256

# Conversation views: the snapshot file, how far the fold moves between
# saves of it, and how much it reads between checkpoints (the first view of
# a long log reads all of it, and other sessions must not wait for that).
CONVO_FILE = "convo.snap"
_CONVO_SAVE_RECORDS = 10_000
_FOLD_CHUNK_RECORDS = 4096
_FOLD_CHUNK_BYTES = 4 << 20
# convo.snap: magic, the session's epoch, a CRC-32 of the epoch and the body;
# then the body, Conversation.to_snapshot() in msgpack.
_CONVO_MAGIC = b"BKC1"
_CONVO_HEAD = struct.Struct(">4sQI")


@dataclass(frozen=True, slots=True)
class ConversationView:
    """A session's conversation as the fold has it, exact at ``next``: it
    folds every record from the snapshot's ``start`` (0 unless retention
    deleted records before they were folded) below ``next``."""

    epoch: int
    next: int
    snapshot: dict[str, Any]      # Conversation.to_snapshot(), in the form asked for


def convo_file(epoch: int, conv: Conversation) -> bytes:
    """The bytes of ``convo.snap`` for ``conv``, a fold of epoch ``epoch``."""
    body: bytes = msgpack.packb(conv.to_snapshot(), use_bin_type=True)
    return _CONVO_HEAD.pack(_CONVO_MAGIC, epoch,
                            zlib.crc32(body, zlib.crc32(epoch.to_bytes(8, "big")))) + body


def read_convo_file(data: bytes) -> tuple[int, Conversation]:
    """(epoch, fold) from the bytes of ``convo.snap``; ValueError if they
    are not a whole, intact snapshot file."""
    if len(data) < _CONVO_HEAD.size:
        raise ValueError("truncated")
    magic, epoch, crc = _CONVO_HEAD.unpack_from(data)
    body = data[_CONVO_HEAD.size:]
    if magic != _CONVO_MAGIC:
        raise ValueError("not a conversation snapshot file")
    if zlib.crc32(body, zlib.crc32(epoch.to_bytes(8, "big"))) != crc:
        raise ValueError("checksum mismatch")
    try:
        snap = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:      # msgpack raises many types; each means "not a snapshot"
        raise ValueError(f"bad msgpack: {exc}") from None
    return epoch, Conversation.from_snapshot(snap)


def _fold_header(header: bytes | None) -> tuple[str | None, Any]:
    """(publisher, meta) of a stored header, for the fold."""
    if header is None:
        return None, None
    try:
        publisher, meta, _ = header_parts(header)
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException):
        return None, None         # folded without it, as view=records shows it without
    return publisher, meta


def _read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


@dataclass(frozen=True, slots=True)
class ProduceResult:
    """The answer to an idempotent producer's append.

    ``status`` is ``accepted``, ``duplicate`` (already appended: nothing new),
    ``stale_epoch`` (a newer epoch of this producer exists: ``epoch``),
    ``invalid_epoch_seq`` (a new epoch must start at seq 0), ``sequence_gap``
    (``expected_seq`` / ``received_seq``) or ``closed``.
    """

    status: str
    epoch: int | None = None
    last_seq: int | None = None
    expected_seq: int | None = None
    received_seq: int | None = None
    closed: bool = False
    offsets: range | None = None

    def with_offsets(self, offsets: range) -> ProduceResult:
        return dataclasses.replace(self, offsets=offsets)


class Reply:
    """A one-shot answer to a command.

    Await ``wait()``, or pass ``on_done``: it is called (on the actor's task,
    so it must not block) with the reply once it is answered.  Pipelined
    publishers use the callback, so a connection needs no task per request.
    """

    __slots__ = ("event", "value", "error", "on_done")

    def __init__(self, on_done: Callable[[Reply], None] | None = None) -> None:
        self.event = trio.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.on_done = on_done

    def set(self, value: Any) -> None:
        self.value = value
        self.event.set()
        if self.on_done is not None:
            self.on_done(self)

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.event.set()
        if self.on_done is not None:
            self.on_done(self)

    async def wait(self) -> Any:
        await self.event.wait()
        if self.error is not None:
            raise self.error
        return self.value


class SessionActor:
    def __init__(self, name: str, directory: str, files: FileCache, config: BrokerConfig,
                 state: BrokerState, on_exit: Callable[[SessionActor], None]) -> None:
        self.name = name
        self.directory = directory
        self._files = files
        self._cfg = config
        self._state = state
        self._new_epoch = state.new_epoch
        # Whether records are shown once written, before their fsync (_run.py).
        self._early = (config.deliver == "written" and config.fsync.durable
                       and state.deliver_written)
        self._on_exit = on_exit
        self._send, self._inbox = trio.open_memory_channel[tuple[str, Any, Reply]](
            config.mailbox_size)
        self.ready = trio.Event()
        self.start_error: BaseException | None = None
        # Published state, read by other tasks (never written by them):
        self.meta: SessionMeta | None = None  # None: the session does not exist
        self.log: SegmentLog | None = None
        self.ring = _core.Ring(config.ring_bytes)
        self.committed = 0                    # records below this are readable
        self.durable = 0                      # records below this are durable (and acked)
        self.changed = trio.Event()           # set when committed, closed or existence changes
        self.readers = 0                      # open subscriptions; keeps the actor alive
        # Called (on the actor's task; they must not block) whenever ``changed``
        # is set: how a connection serving many sessions learns which to read.
        self.watchers: set[Callable[[], None]] = set()
        # Last use, for the sliding TTL.  Kept in memory only: a restart counts as
        # a use, so it can lengthen a session's life but never cut it short.
        self.last_access = time.time()
        self.exited = False
        # Private to the actor task:
        # Appends written, not yet acked: (reply, first offset, count, producer
        # result to answer with, or None to answer with the range of offsets).
        self._pending: list[tuple[Reply, int, int, ProduceResult | None]] = []
        self._metas: dict[int, bytes] = {}    # record meta for the batch being built
        self._flags: dict[int, int] = {}      # record flags (kind) for the batch being built
        self._pending_records = 0
        self._group_deadline = math.inf       # when the unsynced group must start its fsync
        # The fsync in flight, if any (see _start_sync): what it covers, and its
        # outcome once the worker is done (True, or the OSError).
        self._helpers: trio.Nursery | None = None
        self._inflight: tuple[int, list[str], str | None] | None = None
        self._sync_outcome: bool | OSError | None = None
        self._sync_done = trio.Event()
        self._recv_scope: trio.CancelScope | None = None
        self._broken = False                  # the disk failed under a command: stop
        self._seq: str | None = None          # newest Stream-Seq accepted, maybe not stored yet
        self._producers: dict[str, tuple[int, int]] = {}  # producer id -> (epoch, last seq)
        # Where each producer's recent appends landed, (epoch, seq) -> offsets,
        # so that a retry of one is answered with them.  Rebuilt on open from
        # the stamps in the log's tail (_load_producers).
        self._landed: dict[str, dict[tuple[int, int], range]] = {}
        self._producers_changed = False       # the table moved since the last snapshot
        self._snapshot_at = 0                 # offset the last producer snapshot covers
        # The conversation fold, from the first view on (None: nobody asked).
        self._convo: Conversation | None = None
        self._convo_saved = 0                 # offset convo.snap covers, as far as we know
        self._convo_limit = 0                 # the log's end at open: a snapshot past it is stale
        self.folded = 0                       # records the fold has read (a measure, for tests)

    # ------------------------------------------------------------------ api

    async def send(self, kind: str, arg: Any, reply: Reply) -> None:
        """Queue a command; ``reply`` gets the answer. Raises
        trio.ClosedResourceError if the actor has exited (the broker then
        starts a new one)."""
        try:
            await self._send.send((kind, arg, reply))
        except trio.BrokenResourceError:
            raise trio.ClosedResourceError from None

    async def call(self, kind: str, arg: Any = None) -> Any:
        """Send a command and wait for its answer (see ``send``)."""
        reply = Reply()
        await self.send(kind, arg, reply)
        return await reply.wait()

    def info(self) -> SessionInfo:
        meta = self.meta
        if meta is None:
            raise SessionNotFound(self.name)
        assert self.log is not None
        return SessionInfo(meta.name, meta.epoch, meta.content_type, meta.created_at,
                           meta.ttl_s, meta.expires_at, meta.closed, self.log.start_offset,
                           self.committed, dict(meta.extra))

    def read(self, offset: int, max_records: int, max_bytes: int) -> _core.Batch:
        """Committed records from ``offset``; an empty batch at the tail."""
        log = self.log
        if self.meta is None or log is None:
            raise SessionNotFound(self.name)
        if offset < log.start_offset:
            raise OffsetTooOld(offset, log.start_offset)
        if offset > self.committed:
            raise OffsetOutOfRange(offset, self.committed)
        batch = self.ring.read(offset, self.committed, max_records, max_bytes)
        if batch is None:
            batch = log.read(offset, self.committed, max_records, max_bytes)
        return batch

    def touch(self) -> None:
        self.last_access = time.time()

    def expired(self) -> bool:
        return self.meta is not None and self.meta.expired(last_access=self.last_access)

    def resolve(self, offset: int) -> int:
        if self.log is None:
            raise SessionNotFound(self.name)
        if offset == START:
            return self.log.start_offset
        if offset == NOW:
            return self.committed
        if offset < 0:
            raise OffsetOutOfRange(offset, self.committed)
        return offset

    # ---------------------------------------------------------------- the task

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._open()
        except BaseException as exc:
            self.start_error = exc
            self._exit()
            raise
        task_status.started()
        try:
            async with trio.open_nursery() as helpers:
                self._helpers = helpers
                await self._serve()
        except Exception:
            # One session's failure must not take the broker down with it.
            logger.exception("session %r: actor failed; it restarts on next use", self.name)
        finally:
            self._exit()

    async def _open(self) -> None:
        # meta.json is a few hundred bytes: read inline rather than pay a thread hop.
        meta = load_meta(self.directory)
        if meta is not None and meta.name != self.name:
            # Two names in one directory: dir_name maps names apart, so this is
            # a damaged or planted meta.json.  Never serve one session's log
            # under another's name.
            raise StorageError(f"session {self.name!r}: {self.directory} holds "
                               f"{meta.name!r}'s meta.json")
        if meta is not None:
            log = await trio.to_thread.run_sync(SegmentLog.open, self.directory, self._files,
                                                self._cfg)
            if self._state.lost(meta.extra.get("run")) or self.name in self._state.suspect:
                meta = await self._new_incarnation(meta)
            # Reading stamps uses the FileCache, so it runs on the Trio thread.
            self._load_producers(meta, log)
            self._attach(meta, log)
            if os.path.exists(os.path.join(self.directory, CONVO_FILE)):
                # Viewed before: its fold goes on following the records.
                self._convo = await self._load_convo(meta, log)
        self.ready.set()

    async def _new_incarnation(self, meta: SessionMeta) -> SessionMeta:
        """A new epoch for a session whose readers may have seen records that
        are no longer on disk: told to reset, they cannot mistake the records
        now at those offsets for the ones they saw."""
        extra = {k: v for k, v in meta.extra.items() if k != "run"}
        fresh = meta.with_(epoch=self._new_epoch(), extra=extra)
        await self._store_meta(fresh)
        self._state.suspect.discard(self.name)
        logger.warning("session %r: records shown before a machine crash or failed fsync may "
                       "be lost; new epoch %d (was %d)", self.name, fresh.epoch, meta.epoch)
        return fresh

    def _attach(self, meta: SessionMeta, log: SegmentLog) -> None:
        self.log = log
        self.meta = meta
        self.committed = self.durable = self._convo_limit = self.log.next_offset
        self.ring.reset(self.committed)

    def _exit(self) -> None:
        self.exited = True
        self._on_exit(self)
        # Commands still queued were never processed: their senders retry
        # against the next actor.
        while True:
            try:
                _, _, reply = self._inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            reply.fail(trio.ClosedResourceError())
        self._inbox.close()
        if self._inflight is not None and self.log is not None:
            # Stopped (cancelled or failed) with an fsync taken but not settled:
            # its worker has returned (the nursery waited), so unpin its files.
            _, paths, directory = self._inflight
            self._inflight = None
            self.log.end_sync(paths, self._sync_outcome is True, directory)
        if self.log is not None:
            try:
                if self.log.needs_sync():
                    self.log.sync_blocking()
            finally:
                self.log.close()
            self._save_convo_now()
        self._fail_pending(StorageError("the session actor stopped before the append was synced"))
        self._wake()
        self.ready.set()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()
        for watcher in list(self.watchers):
            watcher()

    def _idle(self) -> bool:
        return (self.readers == 0 and not self._pending
                and self._inbox.statistics().current_buffer_used == 0)

    async def _serve(self) -> None:
        fsync = self._cfg.fsync
        while True:
            if self._sync_outcome is not None and not await self._finish_sync():
                return
            self._maybe_start_sync()
            if self._convo is not None:
                await self._keep_folding()
            if self._inflight is not None:
                deadline = math.inf         # the sync worker wakes us (_recv_scope)
            elif self._pending:
                deadline = self._group_deadline
            else:
                idle = self._cfg.idle_timeout_s if self.meta is not None else 1.0
                deadline = trio.current_time() + idle
            cmd = None
            with trio.CancelScope(deadline=deadline) as self._recv_scope:
                try:
                    cmd = await self._inbox.receive()
                except trio.EndOfChannel:
                    await self._commit()
                    return
            self._recv_scope = None
            if cmd is None:
                if not self._pending and self._inflight is None and self._idle():
                    return          # reaped; _exit syncs and closes
                continue
            batch: list[bytes] = []
            while cmd is not None:
                await self._handle(cmd, batch)
                if self._broken:
                    return      # a new actor recovers the log; _exit fails what waits
                try:
                    cmd = self._inbox.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    cmd = None
            self._write(batch)
            if self._pending and not fsync.durable:
                if not await self._commit():
                    return
            elif self._pending and self._group_deadline == math.inf:
                delay = fsync.interval_ms / 1000 if fsync.mode == "group" else 0.0
                self._group_deadline = trio.current_time() + delay

    # ------------------------------------------------------ pipelined commits
    #
    # An fsync runs in a worker thread while the actor goes on taking commands
    # and writing them: appends that arrive during one fsync form the next
    # group, whose fsync starts as soon as this one is done (and, with the
    # group policy, its window has passed or it is full).  So under load the
    # groups grow by themselves, and an append waits for at most the fsync in
    # flight plus its own.  Only what an fsync covers (everything written
    # before it started) is acknowledged and made visible when it completes.

    def _maybe_start_sync(self) -> None:
        log, fsync = self.log, self._cfg.fsync
        if (self._inflight is not None or log is None or not self._pending
                or not fsync.durable):
            return
        if not log.needs_sync():
            self._publish(log.next_offset)    # e.g. a duplicate: nothing new to sync
            return
        unsynced = log.next_offset - self.durable
        if trio.current_time() < self._group_deadline and unsynced < fsync.max_records:
            return
        self._start_sync()

    def _start_sync(self) -> None:
        """Hand what is written so far to an fsync in a worker thread."""
        assert self.log is not None and self._helpers is not None
        self._group_deadline = math.inf
        paths, fds, directory = self.log.begin_sync()
        self._inflight = (self.log.next_offset, paths, directory)
        self._sync_done = trio.Event()
        self._helpers.start_soon(self._sync_worker, fds, directory)

    async def _sync_worker(self, fds: list[int], directory: str | None) -> None:
        try:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(fsync_all, fds, directory)
            self._sync_outcome = True
        except OSError as exc:
            self._sync_outcome = exc
        self._sync_done.set()
        if self._recv_scope is not None:
            self._recv_scope.cancel()

    async def _settle_sync(self) -> bool:
        """Wait for the fsync in flight and take its outcome; False if the disk
        failed (every waiting append is then failed)."""
        with trio.CancelScope(shield=True):    # the worker is shielded: so is its outcome
            await self._sync_done.wait()
        assert self._inflight is not None and self.log is not None
        _, paths, directory = self._inflight
        outcome = self._sync_outcome
        self._inflight = None
        self._sync_outcome = None
        self.log.end_sync(paths, outcome is True, directory)
        if outcome is not True:
            logger.error("session %r: fsync failed: %s", self.name, outcome)
            self._broken = True
            if self.committed > self.durable:
                self._state.suspect.add(self.name)
            self._fail_pending(StorageError(f"fsync failed: {outcome}"))
            return False
        return True

    async def _finish_sync(self) -> bool:
        """Settle the fsync in flight and publish what it covered."""
        assert self._inflight is not None
        upto = self._inflight[0]
        if not await self._settle_sync():
            return False
        if self.meta is not None and self._meta_updates_due():
            # Metadata must describe only durable records: settle everything.
            return await self._commit()
        self._publish(upto)
        return True

    async def _handle(self, cmd: tuple[str, Any, Reply], batch: list[bytes]) -> None:
        kind, arg, reply = cmd
        try:
            if self.expired():
                self._write(batch)
                if await self._commit():
                    await self._do_delete()
            if kind in ("append", "append_seq", "produce", "publish", "close", "set_extra"):
                self.touch()
            if kind == "publish":
                # Records with headers (a WebSocket publish, or an HTTP append
                # stamped with its token's sub), maybe idempotent.
                payloads, pub, producer = arg
                if producer is None:
                    self._check_append(payloads)
                    self._queue(reply, batch, payloads, None, pub)
                else:
                    pid, pepoch, pseq = producer
                    self._produce(reply, batch, payloads, pid, pepoch, pseq, False, pub)
                return
            if kind == "produce":
                if not arg[4]:
                    self._produce(reply, batch, *arg)
                    return
                # Append-and-close: answered once the close, which follows the
                # data, is durable too.
                # With no records this is a close that takes part in the
                # producer's sequence.
                inner = Reply()
                self._produce(inner, batch, *arg)
                self._write(batch)
                if await self._commit() and inner.error is None \
                        and inner.value.status == "accepted":
                    await self._do_close()
                await inner.event.wait()
                if inner.error is not None:
                    raise inner.error
                reply.set(inner.value)
                return
            if kind == "append_seq":
                # Writer coordination: the sequence must rise (as a string).
                # It is made durable in the same commit that acknowledges the data.
                payloads, seq, pub = arg
                self._check_append(payloads)
                assert self.meta is not None
                last = self._seq if self._seq is not None else self.meta.extra.get("stream_seq")
                if isinstance(last, str) and seq <= last:
                    raise SequenceConflict(seq, last)
                self._seq = seq
                self._queue(reply, batch, payloads, None, pub)
                return
            if kind == "append":
                self._check_append(arg)
                self._queue(reply, batch, arg, None)
                return
            if kind == "view":
                # Exact at ``committed``: what is not visible yet is not in
                # it, so nothing need be written or synced first.
                self.touch()
                reply.set(await self._do_view(bool(arg)))
                return
            # Anything else sees every earlier append durable first.
            self._write(batch)
            if not await self._commit():
                raise StorageError("the session's storage failed; retry")
            if kind == "create":
                reply.set(await self._do_create(**arg))
            elif kind == "close":
                reply.set(await self._do_close())
            elif kind == "delete":
                await self._do_delete()
                reply.set(None)
            elif kind == "set_extra":
                reply.set(await self._do_set_extra(arg))
            elif kind == "info":
                reply.set(self.info())
            elif kind == "expire":
                reply.set(None)          # the expiry check above did the work
            elif kind == "sync":
                reply.set(None)
            else:
                raise ValueError(f"unknown command {kind!r}")
        except BrokerError as exc:
            reply.fail(exc)
        except Exception as exc:
            # Whatever went wrong, the caller gets an answer, never a hang.
            if not isinstance(exc, (OSError, ValueError, TypeError)):
                logger.exception("session %r: %s failed", self.name, kind)
            reply.fail(exc)

    # ---------------------------------------------------- idempotent producers

    def _produce(self, reply: Reply, batch: list[bytes], payloads: list[bytes],
                 producer: str, epoch: int, seq: int, close: bool,
                 pub: Publish | None = None) -> None:
        """Validate (producer, epoch, seq) and queue the append if it is new.

        The answer is a ProduceResult.  An accepted append's last record carries
        the stamp (producer, epoch, seq) in its header and its first record
        the APPEND_START flag, so the producer table, and where recent appends
        landed, are rebuilt from the log after a crash; a snapshot in
        meta.json bounds how much of the log that reads.  A duplicate is
        answered only once what it duplicates is durable, with the offsets
        where it landed if they are still known.
        """
        if self.meta is None or self.log is None:
            raise SessionNotFound(self.name)
        self._check_append(payloads, closed_ok=True)
        key = producer_key(pub.publisher if pub is not None else None, producer)
        state = self._producers.get(key)
        if state is None:
            if seq != 0:
                reply.set(ProduceResult("sequence_gap", expected_seq=0, received_seq=seq))
                return
        elif epoch < state[0]:
            reply.set(ProduceResult("stale_epoch", epoch=state[0]))
            return
        elif epoch > state[0]:
            if seq != 0:
                reply.set(ProduceResult("invalid_epoch_seq"))
                return
        elif seq <= state[1]:
            self._queue(reply, batch, [], ProduceResult(
                "duplicate", epoch=epoch, last_seq=state[1], closed=self.meta.closed,
                offsets=self._landed.get(key, {}).get((epoch, seq))))
            return
        elif seq != state[1] + 1:
            reply.set(ProduceResult("sequence_gap", expected_seq=state[1] + 1,
                                    received_seq=seq))
            return
        if self.meta.closed:
            reply.set(ProduceResult("closed"))
            return
        self._producers[key] = (epoch, seq)
        self._producers_changed = True
        first = self.log.next_offset + len(batch)
        self._note_landed(key, epoch, seq, range(first, first + len(payloads)))
        self._queue(reply, batch, payloads,
                    ProduceResult("accepted", epoch=epoch, last_seq=seq, closed=close),
                    pub, (producer, epoch, seq))

    def _note_landed(self, key: str, epoch: int, seq: int, offsets: range) -> None:
        """Remember where a producer's append landed: its last
        _LANDED_PER_PRODUCER appends, for the _LANDED_PRODUCERS producers that
        appended last."""
        recent = self._landed.pop(key, None) or {}
        self._landed[key] = recent                  # now the newest producer
        recent[(epoch, seq)] = offsets
        if len(recent) > _LANDED_PER_PRODUCER:
            del recent[next(iter(recent))]          # its oldest append
        if len(self._landed) > _LANDED_PRODUCERS:
            del self._landed[next(iter(self._landed))]

    def _queue(self, reply: Reply, batch: list[bytes], payloads: Sequence[bytes],
               result: ProduceResult | None, pub: Publish | None = None,
               stamp: tuple[str, int, int] | None = None) -> None:
        """Add ``payloads`` to the batch being built; ``reply`` is answered once
        they are committed (with their offsets, or ``result`` carrying them).

        ``pub`` gives the records' kind and header; ``stamp`` (producer,
        epoch, seq) marks the last record as the end of an idempotent
        producer's append."""
        assert self.log is not None
        base, n = len(batch), len(payloads)
        self._pending.append((reply, self.log.next_offset + base, n, result))
        self._pending_records += n
        batch.extend(payloads)
        if not n or (pub is None and stamp is None):
            return
        pub = pub or _PLAIN
        if pub.kind:
            flags = pub.kind << _core.KIND_SHIFT
            for i in range(base, base + n):
                self._flags[i] = flags
        if stamp is not None:
            # With the stamp on the last record, recovery knows where the
            # whole append landed (see _recover).
            self._flags[base] = self._flags.get(base, 0) | APPEND_START
        metas = pub.metas
        shared = record_header(pub.publisher) if metas is None else None
        for i in range(n - 1):
            h = shared if metas is None else record_header(pub.publisher, metas[i])
            if h is not None:
                self._metas[base + i] = h
        # The last record also carries the producer stamp, if any.
        last = record_header(pub.publisher, None if metas is None else metas[-1], stamp)
        if last is not None:
            self._metas[base + n - 1] = last

    def _producer_snapshot(self, at: int) -> dict[str, Any]:
        self._producers_changed = False
        self._snapshot_at = at
        return {"producers": {"at": at, "state": {k: list(v) for k, v in self._producers.items()}}}

    def _run_recorded(self) -> bool:
        """Whether meta.json names this run, as it must (durably) before the
        session shows a record ahead of its fsync (_run.py)."""
        assert self.meta is not None
        return self.meta.extra.get("run") == self._state.run

    def _meta_updates_due(self) -> bool:
        assert self.meta is not None
        return ((self._seq is not None and self.meta.extra.get("stream_seq") != self._seq)
                or (self._producers_changed and "producers" not in self.meta.extra)
                or (self._early and not self._run_recorded()))

    def _meta_updates(self, next_offset: int) -> dict[str, Any]:
        """What meta.json must learn before this commit's acks go out."""
        assert self.meta is not None or not (self._seq or self._producers_changed)
        updates: dict[str, Any] = {}
        if self.meta is None:
            return updates
        if self._seq is not None and self.meta.extra.get("stream_seq") != self._seq:
            updates["stream_seq"] = self._seq
        if self._early and not self._run_recorded():
            updates["run"] = self._state.run
        # The first producer on a session needs a snapshot before its ack, so
        # recovery knows to look for stamps; after that, the stamps in the log
        # carry the state and a snapshot is only a shortcut, refreshed now and then.
        if self._producers_changed and ("producers" not in self.meta.extra
                                        or next_offset - self._snapshot_at > 100_000):
            updates.update(self._producer_snapshot(next_offset))
        return updates

    def _load_producers(self, meta: SessionMeta, log: SegmentLog) -> None:
        """The producer table and where recent appends landed, from meta.json's
        snapshot and the log.

        The table is the snapshot plus every stamp after its ``at``.  The
        landings come from those records too and, because the snapshot may
        be newer than a producer's last appends (it is taken when the first
        producer appears and on close), from the last records before ``at``
        (_tail).  What a publisher retries after a cut or a restart is what
        was unacknowledged then, so it sits at the tail of the log; a retry
        of anything older is still a duplicate, answered without offsets."""
        snap = meta.extra.get("producers")
        self._producers = {}
        self._landed = {}
        if not isinstance(snap, dict):
            return
        self._producers = {k: (int(v[0]), int(v[1])) for k, v in snap["state"].items()}
        self._snapshot_at = offset = max(int(snap["at"]), log.start_offset)
        start: int | None = None
        for batch in self._tail(log, min(offset, log.next_offset)):
            start = self._recover(batch, start, False)
        while offset < log.next_offset:
            batch = log.read(offset, log.next_offset, 1 << 16, 1 << 24)
            start = self._recover(batch, start, True)
            offset = batch.next_offset

    def _recover(self, batch: _core.Batch, start: int | None, after_snapshot: bool) -> int | None:
        """Learn from the records of ``batch``, read in log order: a stamp
        after the snapshot moves the producer table, and an append whose
        first record (APPEND_START) and stamp are both seen landed between
        them.  ``start`` is the first record of the producer append under way
        where the batch begins (None: not seen); returns the one where it ends."""
        flags, meta = batch.flags, batch.meta
        for i in range(len(batch)):
            if flags(i) & APPEND_START:
                start = batch.offset(i)
            header = meta(i)
            if header is None:
                continue
            publisher, _, stamp = header_parts(header)
            if stamp is None:
                continue
            key = producer_key(publisher, stamp[0])
            if after_snapshot:
                self._producers[key] = (stamp[1], stamp[2])
            if start is not None:
                self._note_landed(key, stamp[1], stamp[2], range(start, batch.offset(i) + 1))
            start = None
        return start

    @staticmethod
    def _tail(log: SegmentLog, upto: int) -> list[_core.Batch]:
        """The last records below ``upto``, in log order.

        At most _LANDED_TAIL_RECORDS records and _LANDED_TAIL_BYTES of
        payload: this runs on the Trio thread whenever a session is opened,
        so it must stay small, and it need only cover the appends a publisher
        may still retry (the Python client keeps at most 64 publishes in
        flight per session, the browser client one; a chat's records are a
        few KiB at most).  The log reads forward only, so it is read newest
        first in chunks that double from one record up to
        _LANDED_TAIL_CHUNK, each forward; a chunk that the byte budget cuts
        short is dropped, since what it lacks is its newest records."""
        chunks: list[list[_core.Batch]] = []
        stop, records, nbytes, size = upto, 0, 0, 1
        while (stop > log.start_offset and records < _LANDED_TAIL_RECORDS
               and nbytes < _LANDED_TAIL_BYTES):
            first = max(log.start_offset, stop - min(size, _LANDED_TAIL_RECORDS - records))
            chunk: list[_core.Batch] = []
            at = first
            while at < stop and nbytes < _LANDED_TAIL_BYTES:
                batch = log.read(at, stop, stop - at, _LANDED_TAIL_BYTES - nbytes)
                if not batch:
                    break
                chunk.append(batch)
                nbytes += batch.nbytes
                at = batch.next_offset
            if at < stop:
                break
            chunks.append(chunk)
            records += stop - first
            stop = first
            size = min(2 * size, _LANDED_TAIL_CHUNK)
        return [batch for chunk in reversed(chunks) for batch in chunk]

    def _check_append(self, payloads: Sequence[bytes], closed_ok: bool = False) -> None:
        if self.meta is None:
            raise SessionNotFound(self.name)
        if self.meta.closed and not closed_ok:
            raise SessionClosed(self.name)
        limit = self._cfg.max_record_bytes
        for p in payloads:
            if len(p) > limit:
                raise RecordTooLarge(len(p), limit)

    def _write(self, batch: list[bytes]) -> None:
        if not batch:
            return
        assert self.log is not None
        ts = time.time_ns() // 1000
        try:
            framed = self.log.append(batch, ts, self._metas or None, self._flags or None)
        except OSError as exc:
            self._metas = {}
            self._flags = {}
            # Nothing of this batch is acknowledged; fail exactly its appends.
            err = StorageError(f"write failed: {exc}")
            n = len(batch)
            while n > 0 and self._pending:
                reply, _, count, _ = self._pending.pop()
                reply.fail(err)
                n -= count
                self._pending_records -= count
            batch.clear()
            return
        self.ring.extend_framed(framed)
        batch.clear()
        self._metas = {}
        self._flags = {}
        if self._early and self._run_recorded():
            self.committed = self.log.next_offset
            self._wake()

    def _fail_pending(self, error: BaseException) -> None:
        """Fail every append that was written but not acknowledged."""
        for reply, _, _, _ in self._pending:
            reply.fail(error)
        self._pending.clear()
        self._pending_records = 0

    async def _commit(self) -> bool:
        """Make everything written durable (per policy), then ack and publish it.

        Returns False if the disk failed: the waiting appends are failed and
        the actor must stop (a new one recovers the log from what is on disk).
        """
        if self._inflight is not None and not await self._settle_sync():
            return False
        self._group_deadline = math.inf
        log = self.log
        if log is None:
            return True
        if self._cfg.fsync.durable and log.needs_sync():
            self._start_sync()
            if not await self._settle_sync():
                return False
        updates = self._meta_updates(log.next_offset)
        if updates and self.meta is not None:
            try:
                await self._store_meta(self.meta.with_(extra={**self.meta.extra, **updates}))
            except OSError as exc:
                logger.error("session %r: storing session metadata failed: %s",
                             self.name, exc)
                self._fail_pending(StorageError(f"storing session metadata failed: {exc}"))
                self._broken = True
                return False
        self._publish(log.next_offset)
        return True

    def _publish(self, upto: int) -> None:
        """Records below ``upto`` are durable: make them visible, ack their appends."""
        self.durable = max(self.durable, upto)
        if upto > self.committed:
            self.committed = upto
            self._wake()
        done = 0
        for reply, first, count, result in self._pending:
            if first + count > upto:
                break
            offsets = range(first, first + count)
            if result is None:
                reply.set(offsets)
            elif result.status == "duplicate":
                reply.set(result)           # its offsets are the original's, if known
            else:
                reply.set(result.with_offsets(offsets))
            self._pending_records -= count
            done += 1
        del self._pending[:done]

    # ------------------------------------------------------------ lifecycle

    async def _do_create(self, content_type: str, ttl_s: float | None,
                         expires_at: float | None, extra: dict[str, Any], closed: bool,
                         initial: list[bytes], pub: Publish | None = None,
                         copied: int = 0) -> tuple[SessionInfo, bool]:
        if self.meta is not None:
            m = self.meta
            if media_type(m.content_type) != media_type(content_type):
                raise SessionExists(self.name, "content type")
            for field, want in (("ttl_s", ttl_s), ("expires_at", expires_at),
                                ("closed", closed)):
                if getattr(m, field) != want:
                    raise SessionExists(self.name, field.replace("_", " "))
            return self.info(), False
        meta = SessionMeta(self.name, self._new_epoch(), content_type, time.time(), ttl_s,
                           expires_at, False, dict(extra))

        durable, files, cfg = self._cfg.fsync.durable, self._files, self._cfg
        data = meta.to_json()    # before touching the disk: bad ``extra`` fails here

        def make() -> SegmentLog:
            os.makedirs(self.directory, exist_ok=True)
            if durable:
                fsync_dir(os.path.dirname(self.directory))
            write_atomic(os.path.join(self.directory, META_FILE), data, durable)
            return SegmentLog.open(self.directory, files, cfg)

        self._attach(meta, await trio.to_thread.run_sync(make))
        self.touch()
        if initial:
            self._check_append(initial)
            batch: list[bytes] = []
            self._queue(Reply(), batch, initial[:copied], None)
            self._queue(Reply(), batch, initial[copied:], None, pub)
            self._write(batch)
            if not await self._commit():
                raise StorageError("the session's storage failed; retry")
        if closed:
            await self._store_meta(meta.with_(closed=True))
        self._wake()
        return self.info(), True

    async def _store_meta(self, meta: SessionMeta) -> None:
        data = meta.to_json()
        await trio.to_thread.run_sync(write_atomic, os.path.join(self.directory, META_FILE),
                                      data, self._cfg.fsync.durable)
        self.meta = meta
        self._wake()

    async def _do_close(self) -> SessionInfo:
        if self.meta is None:
            raise SessionNotFound(self.name)
        if not self.meta.closed:
            # The producer table is snapshotted with the close: a close-only
            # producer request leaves no record to carry its stamp.
            extra = self.meta.extra
            if self._producers:
                extra = {**extra, **self._producer_snapshot(self.committed)}
            await self._store_meta(self.meta.with_(closed=True, extra=extra))
        return self.info()

    async def _do_set_extra(self, changes: dict[str, Any]) -> SessionInfo:
        if self.meta is None:
            raise SessionNotFound(self.name)
        await self._store_meta(self.meta.with_(extra={**self.meta.extra, **changes}))
        return self.info()

    async def _do_delete(self) -> None:
        if self.meta is None or self.log is None:
            raise SessionNotFound(self.name)
        log = self.log
        self.meta = None
        self.log = None
        self._seq = None
        self._producers = {}
        self._landed = {}
        self._producers_changed = False
        self._convo = None
        self._convo_saved = 0
        self.ring.reset(0)
        self.committed = self.durable = 0
        self._wake()
        log.close()
        await trio.to_thread.run_sync(log.remove)
        if self._cfg.fsync.durable:
            await trio.to_thread.run_sync(fsync_dir, os.path.dirname(self.directory))

    # ------------------------------------------------------ conversation views
    #
    # The fold lives here, not in the publish path: an append costs the same
    # whether or not anyone ever asks for a view, and a session nobody views
    # never reads its snapshot file or folds a record.  What a view costs is
    # the records since the previous view (or since the snapshot), read from
    # the ring or the log, of which only the headers and payloads of kinds
    # 1-63 are decoded.

    async def _do_view(self, text: bool) -> ConversationView:
        meta, log = self.meta, self.log
        if meta is None or log is None:
            raise SessionNotFound(self.name)
        conv = self._convo
        if conv is None:
            conv = await self._load_convo(meta, log)
        conv = self._convo = self._within_retention(conv, log)
        await self._fold(conv)
        if conv.next - self._convo_saved >= _CONVO_SAVE_RECORDS:
            await self._save_convo()
        return ConversationView(meta.epoch, conv.next, conv.to_snapshot(text=text))

    def _within_retention(self, conv: Conversation, log: SegmentLog) -> Conversation:
        if conv.next >= log.start_offset:
            return conv
        # Retention deleted records before the fold reached them: it cannot
        # go on exactly, so it starts again from the oldest record left.
        logger.warning("session %r: records %d..%d were deleted before the conversation "
                       "fold read them; it starts again at %d", self.name, conv.next,
                       log.start_offset - 1, log.start_offset)
        return Conversation(json=conv.json, start=log.start_offset)

    async def _keep_folding(self) -> None:
        """Once a session has been viewed, its fold follows the records as
        they become readable, a chunk per turn of the actor's loop, and is
        saved every ``_CONVO_SAVE_RECORDS``: so the next view, and the first
        one after a restart, has little left to fold.  A session never viewed
        (no fold, no convo.snap) pays nothing."""
        conv, log = self._convo, self.log
        if conv is None or log is None or conv.next >= self.committed:
            return
        conv = self._convo = self._within_retention(conv, log)
        self._fold_chunk(conv)
        if conv.next - self._convo_saved >= _CONVO_SAVE_RECORDS:
            await self._save_convo()

    async def _load_convo(self, meta: SessionMeta, log: SegmentLog) -> Conversation:
        """The fold saved in convo.snap if it is of this epoch and within what
        the log held at open (a machine crash may have taken the rest back);
        else an empty fold from the log's oldest record."""
        json_session = media_type(meta.content_type) == "application/json"
        path = os.path.join(self.directory, CONVO_FILE)
        try:
            data = await trio.to_thread.run_sync(_read_bytes, path)
            if data is not None:
                epoch, conv = read_convo_file(data)
                if (epoch == meta.epoch and conv.json == json_session
                        and conv.next <= self._convo_limit):
                    self._convo_saved = conv.next
                    return conv
                logger.info("session %r: %s is stale (epoch %d, next %d; the log is at "
                            "epoch %d and held %d records at open): folding the log",
                            self.name, CONVO_FILE, epoch, conv.next, meta.epoch,
                            self._convo_limit)
        except (OSError, ValueError) as exc:
            logger.warning("session %r: ignoring %s: %s", self.name, CONVO_FILE, exc)
        return Conversation(json=json_session, start=log.start_offset)

    async def _fold(self, conv: Conversation) -> None:
        """Fold the committed records from ``conv.next`` on, a chunk at a time."""
        upto = self.committed
        while conv.next < upto and self._fold_chunk(conv):
            if conv.next < upto:
                await trio.sleep(0)     # a long first fold lets the other sessions run

    def _fold_chunk(self, conv: Conversation) -> bool:
        """Fold up to one chunk of the committed records after ``conv.next``;
        False if there was nothing to read."""
        batch = self.read(conv.next, _FOLD_CHUNK_RECORDS, _FOLD_CHUNK_BYTES)
        if not batch:
            return False
        for i in range(len(batch)):
            kind = (batch.flags(i) >> _core.KIND_SHIFT) & MAX_KIND
            if kind == MESSAGE:
                continue            # not part of the model: its header is not even read
            publisher, meta = _fold_header(batch.meta(i))
            conv.apply(batch.offset(i), kind, publisher, meta, bytes(batch.payload(i)))
        conv.advance(batch.next_offset)
        self.folded += len(batch)
        return True

    async def _save_convo(self) -> None:
        conv, meta = self._convo, self.meta
        assert conv is not None and meta is not None
        if await trio.to_thread.run_sync(self._write_convo, convo_file(meta.epoch, conv)):
            self._convo_saved = conv.next

    def _save_convo_now(self) -> None:
        """On exit: save the fold if it moved since the last save."""
        conv, meta = self._convo, self.meta
        if conv is None or meta is None or conv.next <= self._convo_saved:
            return
        if self._write_convo(convo_file(meta.epoch, conv)):
            self._convo_saved = conv.next

    def _write_convo(self, data: bytes) -> bool:
        """Replace convo.snap with ``data``; False (logged) if the disk refused.
        The snapshot is a shortcut: without it the next actor folds more."""
        try:
            write_atomic(os.path.join(self.directory, CONVO_FILE), data, self._cfg.fsync.durable)
        except OSError as exc:
            logger.warning("session %r: saving %s failed: %s", self.name, CONVO_FILE, exc)
            return False
        return True
