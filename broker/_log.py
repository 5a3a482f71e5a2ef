"""The segment log: one session's records on disk.

Theory of operation
-------------------
A session directory holds segment files named by the offset of their first
record, zero-padded to 20 digits so that ``ls`` sorts them::

    00000000000000000000.log    records 0 .. 41_999
    00000000000000000000.index  its sparse index (derived, rebuilt if missing)
    00000000000000042000.log    the active segment: appends go here

Records are framed by ``broker._core.encode`` (length, flags, offset,
timestamp, payload, CRC-32; see docs/architecture.md).  Only the last segment
is ever written.  When the next append would take it past ``segment_bytes`` it
is *sealed*: its index is written beside it and a new segment starts at the
next offset.  Retention deletes whole sealed segments, oldest first.

The index maps an offset to the file position of a record at or before it, one
entry every ``index_interval_bytes``.  It carries no checksum: it is derived
data.  The active segment's index is rebuilt by the recovery scan on every
open; a sealed segment's index is loaded on first read and rebuilt from the log
if it is missing or does not check out.

Recovery reads the active segment from the start, checking each record's CRC
and that offsets run on without a gap, and truncates the file at the first
record that fails (a torn write from a crash, or corruption), logging how many
bytes were dropped.  Sealed segments were fsynced before anything after them
was acknowledged, so they are trusted at open and checked record by record
when read.

Durability is the caller's business: ``append`` only writes to the OS, and
``begin_sync``/``end_sync`` hand the descriptors that need an fsync to a worker
thread.  This module does blocking I/O and knows nothing of Trio.
"""

from __future__ import annotations

import bisect
import logging
import os
import shutil
import struct
from collections.abc import Sequence

from . import _core
from ._config import BrokerConfig
from ._errors import CorruptRecord, OffsetTooOld
from ._files import FileCache, fsync_dir

log = logging.getLogger("broker.log")

LOG_SUFFIX = ".log"
INDEX_SUFFIX = ".index"
_SCAN_CHUNK = 1 << 20


def segment_file(base: int) -> str:
    return f"{base:020d}{LOG_SUFFIX}"


class _Segment:
    __slots__ = ("base", "path", "index_path", "size", "index")

    def __init__(self, directory: str, base: int, size: int) -> None:
        self.base = base                      # offset of the first record
        self.path = os.path.join(directory, segment_file(base))
        self.index_path = self.path[: -len(LOG_SUFFIX)] + INDEX_SUFFIX
        self.size = size                      # bytes of whole records in the file
        self.index: _core.SparseIndex | None = None  # None: not loaded yet


def _scan_file(path: str, base: int, index: _core.SparseIndex | None) -> tuple[int, int, int]:
    """Walk a segment file; return (good_bytes, next_offset, status)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        pos, expected, status, want = 0, base, _core.OK, _SCAN_CHUNK
        while pos < size:
            data = os.pread(fd, want, pos)
            end, expected, status = _core.scan(data, 0, expected, index, pos)
            pos += end
            want = _SCAN_CHUNK
            if status == _core.OK or (status == _core.PARTIAL and end > 0):
                continue                      # read on from the first unfinished record
            if status != _core.PARTIAL:
                break                         # corrupt
            # The record at pos is longer than a chunk, or torn at the end of the file.
            length = struct.unpack_from("<I", data)[0] if len(data) >= 4 else size
            want = length + _core.RECORD_OVERHEAD
            if pos + want > size:
                break
        return pos, expected, status
    finally:
        os.close(fd)


class SegmentLog:
    """Append-only records of one session, in segment files in ``directory``."""

    def __init__(self, directory: str, files: FileCache, config: BrokerConfig) -> None:
        self.directory = directory
        self._files = files
        self._cfg = config
        self._segments: list[_Segment] = []
        self._bases: list[int] = []          # segment base offsets, for bisect
        self.next_offset = 0                 # offset the next appended record gets
        self._dirty: set[str] = set()        # files written since their last fsync
        self._dir_dirty = False              # a file was created or removed
        self.recovered_bytes_dropped = 0     # what recovery truncated, for tests and logs
        self.syncs = 0                       # fsync rounds completed (a group counts once)
        self._last_chunk: tuple[str, int, bytes] | None = None  # (path, position, bytes)

    # ---------------------------------------------------------------- opening

    @classmethod
    def open(cls, directory: str, files: FileCache, config: BrokerConfig) -> SegmentLog:
        """Open (and recover) the log in ``directory``. Blocking: run it in a thread.

        It opens its own descriptors and closes them again, so it never touches
        the FileCache, which belongs to the Trio thread.
        """
        self = cls(directory, files, config)
        names = sorted(n for n in os.listdir(directory)
                       if n.endswith(LOG_SUFFIX) and len(n) == 24 and n[:20].isdigit())
        for n in os.listdir(directory):
            if n.endswith(".tmp"):
                os.unlink(os.path.join(directory, n))
        segs = [_Segment(directory, int(n[:20]), os.path.getsize(os.path.join(directory, n)))
                for n in names]
        # An empty segment before the last one holds nothing; a crash between
        # creating a segment and writing to it leaves one only at the end.
        for s in segs[:-1]:
            if s.size == 0:
                log.warning("%s: removing empty sealed segment", s.path)
                os.unlink(s.path)
        segs = [s for s in segs[:-1] if s.size] + segs[-1:]
        if not segs:
            segs = [_Segment(directory, 0, 0)]
            fd = os.open(segs[0].path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            if self._cfg.fsync.durable:
                os.fsync(fd)
            os.close(fd)
            if self._cfg.fsync.durable:
                fsync_dir(directory)
        if len(segs) > 1 and segs[-1].size == 0:
            # An empty active segment is only valid if the roll that made it was
            # complete: the sealed segment before it must end whole, just below it.
            prev, empty = segs[-2], segs[-1]
            good, nxt, _ = _scan_file(prev.path, prev.base, None)
            if good < prev.size or nxt != empty.base:
                log.warning("%s: removing empty segment after an incomplete roll", empty.path)
                os.unlink(empty.path)
                segs.pop()
        active = segs[-1]
        active.index = _core.SparseIndex(active.base, config.index_interval_bytes)
        good, self.next_offset, status = _scan_file(active.path, active.base, active.index)
        if good < active.size:
            dropped = active.size - good
            reason = {_core.PARTIAL: "torn record", _core.BAD_CHECKSUM: "checksum mismatch",
                      _core.BAD_HEADER: "bad header"}.get(status, "unreadable")
            log.warning("%s: %s at byte %d (offset %d): truncated %d bytes",
                        active.path, reason, good, self.next_offset, dropped)
            fd = os.open(active.path, os.O_RDWR | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, good)
                os.fsync(fd)
            finally:
                os.close(fd)
            active.size = good
            self.recovered_bytes_dropped = dropped
        self._segments = segs
        self._bases = [s.base for s in segs]
        return self

    @property
    def start_offset(self) -> int:
        """The oldest offset still retained."""
        return self._segments[0].base

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    @property
    def paths(self) -> list[str]:
        return [s.path for s in self._segments]

    # -------------------------------------------------------------- appending

    def append(self, payloads: Sequence[bytes], timestamp: int,
               metas: dict[int, bytes] | None = None,
               flags: dict[int, int] | None = None) -> bytes:
        """Write records for ``payloads`` (``metas`` and ``flags``: record meta
        and flags by position, see _core.encode); return the framed bytes
        written, whose first record is the old ``next_offset``. Not yet durable."""
        active = self._segments[-1]
        total = (sum(map(len, payloads)) + _core.RECORD_OVERHEAD * len(payloads)
                 + (sum(map(len, metas.values())) if metas else 0))
        if active.size and active.size + total > self._cfg.segment_bytes:
            active = self._roll()
        first = self.next_offset
        assert active.index is not None
        data = _core.encode(first, timestamp, payloads, flags or 0, active.index, active.size,
                            metas)
        fd = self._files.fd(active.path)
        try:
            view, pos = memoryview(data), active.size
            while view:
                n = os.pwrite(fd, view, pos)
                view, pos = view[n:], pos + n
        except OSError:
            active.index.truncate(active.size)
            raise
        active.size += len(data)
        self.next_offset += len(payloads)
        self._dirty.add(active.path)
        return data

    def _roll(self) -> _Segment:
        old = self._segments[-1]
        assert old.index is not None
        # Seal the old segment on disk before the new one exists, so recovery,
        # which checks only the last segment, never trusts a sealed segment whose
        # tail a crash could have torn.  Once per segment: cheap.
        if self._cfg.fsync.durable and old.path in self._dirty:
            os.fsync(self._files.fd(old.path))
            self._dirty.discard(old.path)
        # The index is derived: written without fsync, checked when loaded.
        with open(old.index_path, "wb") as f:
            f.write(old.index.to_bytes())
        new = _Segment(self.directory, self.next_offset, 0)
        new.index = _core.SparseIndex(new.base, self._cfg.index_interval_bytes)
        self._files.fd(new.path)
        self._segments.append(new)
        self._bases.append(new.base)
        self._dir_dirty = True
        self._apply_retention()
        return new

    def _apply_retention(self) -> None:
        limit = self._cfg.retention_bytes
        if limit is None:
            return
        total = sum(s.size for s in self._segments)
        while len(self._segments) > 1 and total - self._segments[0].size >= limit:
            old = self._segments.pop(0)
            self._bases.pop(0)
            if self._last_chunk is not None and self._last_chunk[0] == old.path:
                self._last_chunk = None
            total -= old.size
            self._files.close(old.path)
            self._dirty.discard(old.path)
            for p in (old.path, old.index_path):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
            self._dir_dirty = True

    # ---------------------------------------------------------------- syncing

    def needs_sync(self) -> bool:
        return bool(self._dirty) or self._dir_dirty

    def begin_sync(self) -> tuple[list[str], list[int], str | None]:
        """Pin what needs an fsync: (paths, descriptors, directory or None)."""
        paths = sorted(self._dirty)
        fds = [self._files.pin(p) for p in paths]
        directory = self.directory if self._dir_dirty else None
        self._dirty.clear()
        self._dir_dirty = False
        return paths, fds, directory

    def end_sync(self, paths: list[str], ok: bool, directory: str | None) -> None:
        if ok and (paths or directory):
            self.syncs += 1
        for p in paths:
            self._files.unpin(p)
            if not ok:
                self._dirty.add(p)
        if not ok and directory:
            self._dir_dirty = True

    def sync_blocking(self) -> None:
        """fsync everything now, on this thread (shutdown, close)."""
        paths, fds, directory = self.begin_sync()
        ok = False
        try:
            fsync_all(fds, directory)
            ok = True
        finally:
            self.end_sync(paths, ok, directory)

    # ---------------------------------------------------------------- reading

    def read(self, from_offset: int, upto_offset: int, max_records: int,
             max_bytes: int) -> _core.Batch:
        """Records from ``from_offset`` (inclusive) to ``upto_offset`` (exclusive)."""
        if from_offset >= upto_offset:
            return _core.Batch.empty(from_offset)
        i = bisect.bisect_right(self._bases, from_offset) - 1
        if i < 0:
            raise OffsetTooOld(from_offset, self.start_offset)
        seg = self._segments[i]
        if i + 1 < len(self._segments):
            upto_offset = min(upto_offset, self._segments[i + 1].base)
        rebuilt = False
        while True:
            index = self._index(seg)
            try:
                return self._read_segment(seg, index.lookup(from_offset), from_offset,
                                          upto_offset, max_records, max_bytes)
            except CorruptRecord:
                if rebuilt:
                    raise
                # A stale or damaged index can point mid-record: rebuild, retry once.
                seg.index = self._rebuild_index(seg)
                rebuilt = True

    def _read_segment(self, seg: _Segment, pos: int, from_offset: int, upto_offset: int,
                      max_records: int, max_bytes: int) -> _core.Batch:
        chunk = self._cfg.read_chunk_bytes
        want, fresh = chunk, False
        while pos < seg.size:
            data, base = self._chunk_at(seg, pos, want, fresh)
            rel = pos - base
            batch, end, status = _core.decode(data, rel, from_offset, upto_offset,
                                              max_records, max_bytes)
            if batch:
                return batch
            consumed = end - rel
            if status == _core.OK and consumed > 0:
                pos, want, fresh = base + end, chunk, False      # skipped a whole chunk
                continue
            if status == _core.PARTIAL and base + len(data) < seg.size:
                pos = base + end
                if consumed > 0 or not fresh:
                    want, fresh = chunk, True                    # re-read from that record
                else:
                    (length,) = struct.unpack_from("<I", data, end)
                    want = length + _core.RECORD_OVERHEAD        # one record beyond a chunk
                continue
            raise CorruptRecord(seg.path, base + end,
                                {_core.BAD_CHECKSUM: "checksum mismatch",
                                 _core.BAD_HEADER: "bad header"}.get(status, "truncated"))
        raise CorruptRecord(seg.path, pos, f"offset {from_offset} not found")

    def _chunk_at(self, seg: _Segment, pos: int, want: int, fresh: bool) -> tuple[bytes, int]:
        """Bytes of ``seg`` from ``pos`` (or from before it): (data, file position of data[0]).

        The last chunk read is kept: a reader's next batch usually starts inside
        it, and bytes below a segment's size never change (it is append-only).
        """
        cached = self._last_chunk
        if not fresh and cached is not None and cached[0] == seg.path:
            start, end = cached[1], cached[1] + len(cached[2])
            # Reuse it if it still holds a good part of what is wanted; if the
            # file has grown past it, a short remainder is not worth a short batch.
            if start <= pos < end and end >= min(seg.size, pos + want // 2):
                return cached[2], start
        data = os.pread(self._files.fd(seg.path), min(want, seg.size - pos), pos)
        self._last_chunk = (seg.path, pos, data)
        return data, pos

    def _index(self, seg: _Segment) -> _core.SparseIndex:
        if seg.index is not None:
            return seg.index
        interval = self._cfg.index_interval_bytes
        idx = None
        try:
            with open(seg.index_path, "rb") as f:
                idx = _core.SparseIndex.from_bytes(seg.base, interval, f.read(), seg.size)
        except FileNotFoundError:
            pass
        if idx is None:
            idx = self._rebuild_index(seg)
        seg.index = idx
        return idx

    def _rebuild_index(self, seg: _Segment) -> _core.SparseIndex:
        idx = _core.SparseIndex(seg.base, self._cfg.index_interval_bytes)
        good, _, status = _scan_file(seg.path, seg.base, idx)
        if good < seg.size:
            log.error("%s: sealed segment is damaged at byte %d; records after it are "
                      "unreadable", seg.path, good)
        log.info("%s: rebuilt index (%d entries)", seg.index_path, len(idx))
        with open(seg.index_path, "wb") as f:
            f.write(idx.to_bytes())
        return idx

    # --------------------------------------------------------------- closing

    def close(self) -> None:
        """Release every descriptor; the files stay."""
        for s in self._segments:
            self._files.close(s.path)

    def remove(self) -> None:
        """Close and delete the whole directory."""
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def fsync_all(fds: list[int], directory: str | None) -> None:
    for fd in fds:
        os.fsync(fd)
    if directory:
        fsync_dir(directory)
