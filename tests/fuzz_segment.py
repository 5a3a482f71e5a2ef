"""Fuzz the segment reader: ``_core.scan``/``decode``, index loading, and
``SegmentLog`` recovery and reads over damaged files (broker/_log.py).

    python tests/fuzz_segment.py --seconds 60 [--seed N]
    python tests/fuzz_segment.py --atheris --seconds 600 [libFuzzer flags] [corpus | crash file]

Three kinds of case, in turn:

* **bytes**: framed records, valid or mangled (bit flips, truncations,
  splices, zeroed spans, random bytes), go to ``scan`` and ``decode`` at random
  positions and limits.  Both must agree with ``ref_scan``/``ref_decode``, a
  plain-Python reading of the record format in docs/architecture.md (struct +
  zlib), and every record ``decode`` returns must pass its CRC.
* **index**: random and mangled index files go to ``SparseIndex.from_bytes``,
  which must refuse them (None) or give strictly increasing entries inside the
  file.
* **active file**: valid or mangled bytes as the only segment of a log; open
  truncates it exactly where the reference scan stops, and the records before
  that read back whole.
* **files**: a log written by ``SegmentLog`` (small segments, so it rolls)
  has its active segment, or one sealed segment, or its index files damaged,
  or stray empty segments added; then ``SegmentLog.open`` recovers it.  Open
  raises nothing; the active segment is truncated exactly where the reference
  scan stops, and every record before the first damaged byte is kept.  Reads
  of every offset either return the original records (byte for byte, header
  fields too) or raise ``CorruptRecord`` (``OffsetTooOld`` below the start),
  and records wholly before the damage in a sealed segment always read.
  Appending after recovery continues at ``next_offset``, and a second open
  drops nothing.

Each case is bounded by its input, so the run cannot hang; as a backstop, the
command-line run dumps every thread and exits if it overruns its time by a
minute.  ``--atheris`` hands the bytes, index and active-file checks to
libFuzzer (coverage guided), seeded with valid segments; extra arguments go to
libFuzzer.
``test_fuzz.py`` runs the random mode for about two seconds.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import random
import shutil
import struct
import sys
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _fuzzmain  # noqa: E402
from broker import _core, _files, _log  # noqa: E402
from broker._config import BrokerConfig, FsyncPolicy  # noqa: E402
from broker._errors import CorruptRecord, OffsetTooOld  # noqa: E402
from broker._files import FileCache  # noqa: E402
from broker._log import SegmentLog, segment_file  # noqa: E402

HEADER = struct.Struct("<IHHqq")      # length, flags, meta length, offset, timestamp
HDR, OVH = 24, 28
OK, PARTIAL, BAD_CHECKSUM, BAD_HEADER = 0, 1, 2, 3


@dataclass(frozen=True)
class Rec:
    pos: int            # where it starts in its buffer
    offset: int
    ts: int
    flags: int
    meta: bytes
    payload: bytes

    @property
    def end(self) -> int:
        return self.pos + OVH + len(self.meta) + len(self.payload)


# ---------------------------------------------------------------- the model

def _check(data: bytes, pos: int, expected: int, max_payload: int,
           verify: bool) -> tuple[int, Rec | None]:
    """One record at ``pos``, as docs/architecture.md frames it: (status, record)."""
    if len(data) - pos < HDR:
        return PARTIAL, None
    length, flags, meta_len, offset, ts = HEADER.unpack_from(data, pos)
    if length > max_payload or meta_len > length or (expected >= 0 and offset != expected):
        return BAD_HEADER, None
    end = pos + HDR + length
    if len(data) < end + 4:
        return PARTIAL, None
    if verify and zlib.crc32(data[pos:end]) != struct.unpack_from("<I", data, end)[0]:
        return BAD_CHECKSUM, None
    body = data[pos + HDR:end]
    return OK, Rec(pos, offset, ts, flags, body[:meta_len], body[meta_len:])


def ref_scan(data: bytes, pos: int, expected: int,
             max_payload: int = _core.MAX_PAYLOAD) -> tuple[int, int, int, list[Rec]]:
    """(end, next offset, status, the good records) of a walk from ``pos``."""
    recs: list[Rec] = []
    status = OK
    while pos < len(data):
        status, rec = _check(data, pos, expected, max_payload, True)
        if rec is None:
            break
        recs.append(rec)
        expected = rec.offset + 1
        pos = rec.end
    return pos, expected, status, recs


def ref_decode(data: bytes, pos: int, start: int, upto: int, max_records: int,
               max_bytes: int, max_payload: int) -> tuple[list[Rec], int, int]:
    """What ``decode`` promises: skip (unverified) to ``start``, then verified
    records at start, start+1, ... below ``upto``, at most ``max_records``, and
    within ``max_bytes`` of payload unless it is the first."""
    off = -1
    while pos < len(data):
        status, rec = _check(data, pos, off, max_payload, False)
        if rec is None:
            return [], pos, status
        off = rec.offset
        if off >= start:
            break
        pos, off = rec.end, off + 1
    if pos >= len(data):
        return [], pos, OK
    if off != start:
        return [], pos, BAD_HEADER
    out: list[Rec] = []
    total, status, scan = 0, OK, pos
    while scan < len(data) and len(out) < max_records:
        if upto >= 0 and start + len(out) >= upto:
            break
        status, rec = _check(data, scan, start + len(out), max_payload, True)
        if rec is None:
            break
        size = len(rec.meta) + len(rec.payload)
        if out and total + size > max_bytes:
            break
        total += size
        out.append(rec)
        scan = rec.end
    if not out:
        return [], pos, status
    return out, out[-1].end, status


def batch_records(batch: _core.Batch) -> list[tuple[int, int, int, bytes, bytes]]:
    return [(batch.offset(i), batch.timestamp(i), batch.flags(i),
             batch.meta(i) or b"", bytes(batch.payload(i))) for i in range(len(batch))]


def as_tuples(recs: list[Rec]) -> list[tuple[int, int, int, bytes, bytes]]:
    return [(r.offset, r.ts, r.flags, r.meta, r.payload) for r in recs]


# ---------------------------------------------------------------- inputs

def random_records(rng: random.Random, n: int) -> tuple[list[bytes], dict[int, bytes],
                                                      dict[int, int]]:
    payloads = [rng.randbytes(rng.choice([0, 1, 7, 40, 200, 300, 3000])
                              if rng.random() < 0.9 else rng.randint(0, 20))
                for _ in range(n)]
    metas = {i: rng.randbytes(rng.randint(1, 30)) for i in range(n) if rng.random() < 0.2}
    flags = {i: rng.randrange(1 << 16) for i in range(n) if rng.random() < 0.2}
    return payloads, metas, flags


def valid_segment(rng: random.Random, base: int) -> bytes:
    out, first = [], base
    for _ in range(rng.randint(1, 4)):
        payloads, metas, flags = random_records(rng, rng.randint(1, 6))
        out.append(_core.encode(first, rng.randrange(1 << 62), payloads, flags, None, 0, metas))
        first += len(payloads)
    return b"".join(out)


def damage(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(7)
        if kind == 0 and buf:          # flip a bit, often in a header
            i = rng.randrange(min(len(buf), 32) if rng.random() < 0.3 else len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif kind == 1 and buf:        # truncate (a torn write)
            del buf[rng.randrange(len(buf)):]
        elif kind == 2:                # insert random bytes
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, 40))
        elif kind == 3 and buf:        # drop a span
            i = rng.randrange(len(buf))
            del buf[i:i + rng.randint(1, 40)]
        elif kind == 4:                # splice: copy a tail elsewhere
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = buf[rng.randrange(len(buf) + 1):]
        elif kind == 5 and buf:        # zero a span (a page that never hit the disk)
            i = rng.randrange(len(buf))
            n = min(len(buf) - i, rng.randint(1, 600))
            buf[i:i + n] = bytes(n)
        else:                          # garbage on the end
            buf += rng.randbytes(rng.randint(1, 64))
    return bytes(buf)


def first_difference(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


# ---------------------------------------------------------------- bytes

def check_bytes(data: bytes, rng: random.Random) -> None:
    n = len(data)
    pos = rng.choice([0, 0, rng.randint(0, n)])
    max_payload = rng.choice([_core.MAX_PAYLOAD, _core.MAX_PAYLOAD, 100, 0])
    expected = rng.choice([-1, 0, rng.randrange(1 << 40)])
    index = _core.SparseIndex(max(expected, 0), rng.choice([1, 64, 4096]))
    end, nxt, status = _core.scan(data, pos, expected, index, 1000, max_payload)
    r_end, r_nxt, r_status, recs = ref_scan(data, pos, expected, max_payload)
    assert (end, nxt, status) == (r_end, r_nxt, r_status), (data[:80], pos, expected)
    starts = {r.pos + 1000 for r in recs}
    entries = index.entries()
    assert all(p in starts for _, p in entries), entries
    assert [p for _, p in entries] == sorted({p for _, p in entries})

    start = rng.choice([0, 1, 3, rng.randrange(1 << 40)] + [r.offset for r in recs[:3]])
    upto = rng.choice([-1, -1, start + rng.randint(0, 5)])
    max_records = rng.choice([1 << 30, 1, 2])
    max_bytes = rng.choice([1 << 30, 0, 50])
    batch, d_end, d_status = _core.decode(data, pos, start, upto, max_records, max_bytes,
                                          max_payload)
    want, w_end, w_status = ref_decode(data, pos, start, upto, max_records, max_bytes,
                                       max_payload)
    assert (batch_records(batch), d_end, d_status) == (as_tuples(want), w_end, w_status), \
        (data[:80], pos, start, upto)
    assert batch.next_offset == start + len(batch)
    for r in want:          # every record decode returns passes its CRC
        assert zlib.crc32(data[r.pos:r.end - 4]) == struct.unpack_from("<I", data, r.end - 4)[0]


def bytes_case(rng: random.Random) -> None:
    roll = rng.random()
    if roll < 0.1:
        data = rng.randbytes(rng.randint(0, 100))
    else:
        data = valid_segment(rng, rng.choice([0, 5, 1 << 33]))
        if roll < 0.8:
            data = damage(rng, data)
    check_bytes(data, rng)


# ---------------------------------------------------------------- index

def check_index(data: bytes, base: int, limit: int) -> None:
    idx = _core.SparseIndex.from_bytes(base, 4096, data, limit)
    if idx is None:
        return
    entries = idx.entries()
    assert len(entries) * 8 == len(data)
    assert all(0 <= p < limit for _, p in entries)
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(entries, entries[1:]))
    assert idx.to_bytes() == data
    for o in (base - 1, base, base + 1, *(o for o, _ in entries[:3]), 1 << 50):
        p = idx.lookup(o)
        assert p == 0 or p in {q for _, q in entries}


def index_case(rng: random.Random) -> None:
    if rng.random() < 0.5:
        data = rng.randbytes(8 * rng.randint(0, 6) + (rng.random() < 0.2))
    else:
        idx = _core.SparseIndex(7, 1)
        pos = 0
        for i in range(rng.randint(0, 8)):
            pos += rng.randint(1, 300)
            idx.note(7 + i * rng.randint(1, 3), pos)
        data = idx.to_bytes()
        if rng.random() < 0.7:
            data = damage(rng, data)
    check_index(data, rng.choice([0, 7, 1 << 40]), rng.choice([0, 100, 1 << 20]))


# ---------------------------------------------------------------- files

@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Recovery and reads log every damaged file: expected here, noise on a terminal."""
    logger = logging.getLogger("broker.log")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def write_log(directory: str, rng: random.Random, cfg: BrokerConfig
              ) -> dict[int, tuple[int, int, int, bytes, bytes]]:
    """A log written by SegmentLog itself; the records it holds, by offset."""
    # A small cache: sync_blocking pins every dirty segment at once, past the cap.
    files = FileCache(4)
    log = SegmentLog.open(directory, files, cfg)
    records: dict[int, tuple[int, int, int, bytes, bytes]] = {}
    try:
        for _ in range(rng.randint(1, 25)):
            payloads, metas, flags = random_records(rng, rng.randint(1, 4))
            ts = rng.randrange(1 << 62)
            first = log.next_offset
            log.append(payloads, ts, metas or None, flags or None)
            for i, p in enumerate(payloads):
                records[first + i] = (first + i, ts, flags.get(i, 0), metas.get(i, b""), p)
        log.sync_blocking()
    finally:
        log.close()
        files.close_all()
    return records


def segment_records(path: Path) -> list[Rec]:
    """The records of a whole segment file (before any damage)."""
    data = path.read_bytes()
    end, _, status, recs = ref_scan(data, 0, -1)
    assert (end, status) == (len(data), OK), path
    return recs


def files_case(rng: random.Random, root: str) -> None:
    directory = os.path.join(root, "log")
    shutil.rmtree(directory, ignore_errors=True)
    os.mkdir(directory)
    cfg = BrokerConfig(fsync=FsyncPolicy("never"),
                       segment_bytes=rng.choice([256, 1024, 4096, 1 << 20]),
                       index_interval_bytes=rng.choice([1, 64, 4096]),
                       read_chunk_bytes=rng.choice([64, 512, 1 << 18]))
    records = write_log(directory, rng, cfg)
    total = len(records)
    logs = sorted(Path(directory).glob("*.log"))
    bases = [int(p.name[:20]) for p in logs]
    layout = {p: segment_records(p) for p in logs}

    # Damage one thing; note where each segment's intact prefix ends.
    intact_before = {p: p.stat().st_size for p in logs}
    kind = rng.choice(["active", "active", "sealed", "index", "strays"])
    if kind == "sealed" and len(logs) == 1:
        kind = "active"
    target: Path | None = None
    new = b""
    if kind in ("active", "sealed"):
        target = logs[-1] if kind == "active" else rng.choice(logs[:-1])
        old = target.read_bytes()
        new = damage(rng, old)
        target.write_bytes(new)
        intact_before[target] = first_difference(old, new)
        if kind == "sealed" and rng.random() < 0.5:
            target.with_suffix(".index").unlink(missing_ok=True)
    elif kind == "index":
        for p in logs[:-1]:
            ip = p.with_suffix(".index")
            roll = rng.random()
            if roll < 0.3:
                ip.unlink(missing_ok=True)
            elif roll < 0.6:
                ip.write_bytes(rng.randbytes(8 * rng.randint(0, 5)))
            elif ip.exists():
                ip.write_bytes(damage(rng, ip.read_bytes()))
    else:
        Path(directory, segment_file(total + rng.choice([0, 0, 3]))).touch()
        Path(directory, "123.log").write_bytes(b"junk")
        Path(directory, "x.tmp").write_bytes(b"junk")

    files = FileCache(4)       # small, so reads evict and reopen descriptors
    log = SegmentLog.open(directory, files, cfg)
    try:
        assert not Path(directory, "x.tmp").exists()
        active_base = bases[-1]
        if kind == "active":
            assert target is not None
            # Even damaged down to nothing it stays the active segment: the
            # sealed one before it is intact, so the roll that made it was whole.
            data = target.read_bytes()
            r_end, r_next, _, _ = ref_scan(new, 0, active_base)
            assert log.next_offset == r_next, (log.next_offset, r_next)
            assert len(data) == r_end and data == new[:r_end]
            kept = active_base + sum(1 for r in layout[target] if r.end <= intact_before[target])
            assert log.next_offset >= kept
        else:
            assert log.next_offset == total, (kind, log.next_offset, total)
        # A sealed segment damaged down to nothing is dropped at open, as a
        # crash between creating a segment and writing to it would leave.
        dropped_first = kind == "sealed" and target == logs[0] and not new
        assert log.start_offset == (bases[1] if dropped_first else 0), (kind, log.start_offset)
        if log.start_offset:
            try:
                log.read(0, log.next_offset, 1, 1)
            except OffsetTooOld as exc:
                assert exc.earliest == log.start_offset
            else:
                raise AssertionError("a read below the start did not raise OffsetTooOld")

        # Every offset: the original record, or CorruptRecord; never anything else.
        must_read = set()
        for p, recs in layout.items():
            must_read |= {r.offset for r in recs if r.end <= intact_before[p]}
        for o in range(log.start_offset, log.next_offset):
            max_records = rng.choice([1, 3, 1 << 20])
            try:
                batch = log.read(o, log.next_offset, max_records, rng.choice([0, 100, 1 << 20]))
            except CorruptRecord:
                assert o not in must_read, (kind, o)
                continue
            got = batch_records(batch)
            assert got and got[0][0] == o, (kind, o, got[:1])
            assert got == [records[r[0]] for r in got], (kind, o)

        # Recovery left a log that takes appends where it ends.
        nxt = log.next_offset
        log.append([b"after recovery"], 42)
        log.sync_blocking()
        assert log.read(nxt, nxt + 1, 1, 1 << 20).payloads() == [b"after recovery"]
    finally:
        log.close()
        files.close_all()
    files = FileCache(4)
    again = SegmentLog.open(directory, files, cfg)
    try:
        assert again.recovered_bytes_dropped == 0
        assert again.next_offset == nxt + 1
    finally:
        again.close()
        files.close_all()


# ---------------------------------------------------------------- running

def check_active_file(data: bytes, root: str, chunk: int) -> None:
    """``data`` as the only segment of a log: open truncates it exactly where
    the reference scan stops, and every record before that reads back."""
    directory = os.path.join(root, "one")
    shutil.rmtree(directory, ignore_errors=True)
    os.mkdir(directory)
    Path(directory, segment_file(0)).write_bytes(data)
    cfg = BrokerConfig(fsync=FsyncPolicy("never"), index_interval_bytes=64,
                       read_chunk_bytes=chunk)
    files = FileCache(4)
    log = SegmentLog.open(directory, files, cfg)
    try:
        end, nxt, _, recs = ref_scan(data, 0, 0)
        assert log.next_offset == nxt, (log.next_offset, nxt)
        assert Path(directory, segment_file(0)).read_bytes() == data[:end]
        assert log.recovered_bytes_dropped == len(data) - end
        got: list[tuple[int, int, int, bytes, bytes]] = []
        while len(got) < nxt:
            got += batch_records(log.read(len(got), nxt, 1 << 20, 1 << 20))
        assert got == as_tuples(recs)
    finally:
        log.close()
        files.close_all()


def active_file_case(rng: random.Random, root: str) -> None:
    data = valid_segment(rng, 0)
    if rng.random() < 0.8:
        data = damage(rng, data)
    check_active_file(data, root, rng.choice([64, 1 << 18]))


def one_case(rng: random.Random, root: str) -> None:
    roll = rng.random()
    if roll < 0.55:
        bytes_case(rng)
    elif roll < 0.7:
        index_case(rng)
    elif roll < 0.8:
        with quiet():
            active_file_case(rng, root)
    else:
        with quiet():
            files_case(rng, root)


_ATHERIS_ROOT = ""


def one_input(data: bytes) -> None:
    """The atheris entry: the first byte picks the check and seeds its choices."""
    if not data:
        return
    rng = random.Random(data[0])
    if data[0] % 3 == 0:
        check_bytes(data[1:], rng)
    elif data[0] % 3 == 1:
        check_index(data[1:], rng.choice([0, 7]), rng.choice([0, 100, 1 << 20]))
    else:
        check_active_file(data[1:], _ATHERIS_ROOT, rng.choice([64, 1 << 18]))


def run(seconds: float, seed: int) -> int:
    """Fuzz for about ``seconds``; return the number of cases."""
    with tempfile.TemporaryDirectory(prefix="fuzz_segment-") as root:
        return _fuzzmain.repeat(lambda rng: one_case(rng, root), seconds, seed)


def run_atheris(seconds: float, seed: int, extra: list[str]) -> None:
    global _ATHERIS_ROOT
    _ATHERIS_ROOT = tempfile.mkdtemp(prefix="fuzz_segment-")
    atexit.register(shutil.rmtree, _ATHERIS_ROOT, True)
    logging.getLogger("broker.log").setLevel(logging.CRITICAL)
    _fuzzmain.run_atheris("fuzz_segment", seconds, seed, extra, one_input, [_log, _files],
                          lambda rng: (bytes([i % 3]) + valid_segment(rng, 0)
                                       for i in range(60)))


def main() -> int:
    return _fuzzmain.main(__doc__, run, run_atheris)


if __name__ == "__main__":
    sys.exit(main())
