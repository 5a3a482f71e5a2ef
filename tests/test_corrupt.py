"""Damaged files on disk: flipped bytes, lost or garbage indexes, empty segments.

Each test writes a session through the broker, closes it, damages the files the
way a crash or a bad disk would, and reopens it.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import pytest

import broker
from broker import _core

from _disk import HEADER, parse_segment, read_all, segment_files

OVERHEAD = HEADER.size + 4            # + CRC-32 trailer


# ------------------------------------------------------------------- helpers

def session_dir(data: Path, name: str) -> Path:
    return data / "sessions" / name       # the tests' names need no escaping


def flip(path: Path, pos: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        (byte,) = f.read(1)
        f.seek(pos)
        f.write(bytes([byte ^ mask]))


async def read_each(b: broker.Broker, name: str, offsets: range) -> list[bytes]:
    """Each offset on its own: every index lookup gets exercised."""
    out = []
    for o in offsets:
        batch = await b.read(name, o, max_records=1)
        assert (batch.first_offset, len(batch)) == (o, 1)
        out.append(batch.payloads()[0])
    return out


def make_payloads(n: int, salt: str = "") -> list[bytes]:
    return [(f"{salt}record {i}:".encode() * (i % 9 + 2))[: 40 + (i * 37) % 90]
            for i in range(n)]


async def populate(data: Path, name: str, payloads: list[bytes], **cfg: object) -> None:
    async with broker.open_broker(data, **cfg) as b:
        await b.create(name)
        i = 0
        while i < len(payloads):          # singles and batches
            k = 1 if i % 3 else min(5, len(payloads) - i)
            assert await b.append_many(name, payloads[i:i + k]) == range(i, i + k)
            i += k


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "broker.log" and r.levelno >= logging.WARNING]


SMALL = {"segment_bytes": 2048, "ring_bytes": 512}


# ------------------------------------------- (a) a flipped byte, active segment

# Where in a record the byte is flipped, the XOR mask, and the reason recovery
# gives (None: any reason; a length that now runs past the end looks torn).
FIELDS = {
    "length-low": (lambda n: 0, 0x01, "checksum mismatch"),
    "length-mid": (lambda n: 2, 0x01, None),
    "length-top": (lambda n: 3, 0x80, "bad header"),
    "flags": (lambda n: 4, 0x01, "checksum mismatch"),
    "meta-length": (lambda n: 6, 0x01, "checksum mismatch"),
    "meta-length-top": (lambda n: 7, 0x80, "bad header"),
    "offset": (lambda n: 8, 0x01, "bad header"),
    "timestamp": (lambda n: 16, 0x40, "checksum mismatch"),
    "payload": (lambda n: HEADER.size + n // 2, 0x01, "checksum mismatch"),
    "crc": (lambda n: HEADER.size + n + 2, 0x01, "checksum mismatch"),
}


@pytest.mark.parametrize("which", ["first", "middle", "last"])
@pytest.mark.parametrize("field", list(FIELDS))
async def test_flipped_byte_in_active_segment_truncates_from_there(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, field: str, which: str) -> None:
    payloads = make_payloads(60)
    await populate(tmp_path, "s", payloads, **SMALL)
    segs = segment_files(session_dir(tmp_path, "s"))
    assert len(segs) >= 3
    sealed_before = [p.read_bytes() for p in segs[:-1]]
    active = segs[-1]
    records = parse_segment(active)
    assert len(records) >= 5
    pos, bad, payload = records[{"first": 0, "middle": len(records) // 2, "last": -1}[which]]
    where, mask, reason = FIELDS[field]
    if which == "last" and field.startswith("length"):
        reason = None                   # a longer last record looks torn
    flip(active, pos + where(len(payload)), mask)
    size = active.stat().st_size

    caplog.set_level(logging.INFO, logger="broker.log")
    async with broker.open_broker(tmp_path, **SMALL) as b:
        info = await b.info("s")
        assert (info.start_offset, info.next_offset) == (0, bad)
        assert await read_all(b, "s") == payloads[:bad]
        msgs = warnings_of(caplog)
        assert len(msgs) == 1, msgs
        assert str(active) in msgs[0] and f"truncated {size - pos} bytes" in msgs[0], msgs
        assert f"at byte {pos} (offset {bad})" in msgs[0], msgs
        if reason is not None:
            assert reason in msgs[0], msgs
        assert active.stat().st_size == pos
        assert [p.read_bytes() for p in segs[:-1]] == sealed_before
        # New appends take the offsets of the dropped records.
        assert await b.append("s", b"new") == bad
        assert await b.append_many("s", [b"x", b""]) == range(bad + 1, bad + 3)
        assert (await b.read("s", bad)).payloads() == [b"new", b"x", b""]

    caplog.clear()
    async with broker.open_broker(tmp_path, **SMALL) as b:
        assert await read_all(b, "s") == payloads[:bad] + [b"new", b"x", b""]
    assert warnings_of(caplog) == []


async def test_flipped_byte_after_records_larger_than_a_scan_chunk(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Recovery and reads go in chunks (1 MiB, 256 KiB): records bigger than a
    # chunk, and records that straddle chunk ends, come before the damage.
    sizes = [300_000, 1_500_000, 200_000, 700_000, 5, 900_000, 100_000, 64]
    payloads = [bytes([65 + i]) * n for i, n in enumerate(sizes)]
    await populate(tmp_path, "big", payloads)
    (seg,) = segment_files(session_dir(tmp_path, "big"))
    records = parse_segment(seg)
    pos = records[6][0]
    assert pos > 3 << 20
    flip(seg, pos + HEADER.size + 50_000)
    size = seg.stat().st_size

    caplog.set_level(logging.WARNING, logger="broker.log")
    async with broker.open_broker(tmp_path) as b:
        assert (await b.info("big")).next_offset == 6
        assert await read_each(b, "big", range(6)) == payloads[:6]
        assert await read_all(b, "big") == payloads[:6]
        assert await b.append("big", b"z" * 10) == 6
    msgs = warnings_of(caplog)
    assert len(msgs) == 1 and f"truncated {size - pos} bytes" in msgs[0], msgs


# --------------------------------------------- (b) a flipped byte, sealed segment

@pytest.mark.parametrize("which", ["first", "middle"])
@pytest.mark.parametrize("field", ["payload", "crc", "offset", "length-top", "timestamp"])
async def test_flipped_byte_in_sealed_segment_fails_only_that_read(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, field: str, which: str) -> None:
    victim, other = make_payloads(90, "v"), make_payloads(30, "o")
    await populate(tmp_path, "victim", victim, **SMALL)
    await populate(tmp_path, "other", other, **SMALL)
    segs = segment_files(session_dir(tmp_path, "victim"))
    assert len(segs) >= 4
    damaged = segs[1]
    records = parse_segment(damaged)
    first, last = records[0][1], records[-1][1]
    pos, bad, payload = records[0 if which == "first" else len(records) // 2]
    where, mask, _ = FIELDS[field]
    flip(damaged, pos + where(len(payload)), mask)

    caplog.set_level(logging.WARNING, logger="broker.log")
    async with broker.open_broker(tmp_path, **SMALL) as b:
        # Sealed segments are trusted at open: nothing is truncated.
        assert (await b.info("victim")).next_offset == 90
        assert warnings_of(caplog) == []
        assert damaged.stat().st_size == records[-1][0] + OVERHEAD + len(records[-1][2])

        for attempt in range(2):            # and again, with the index rebuilt
            with pytest.raises(broker.CorruptRecord) as e:
                await b.read("victim", bad)
            assert e.value.path == str(damaged)
            assert e.value.code == "corrupt_record"

        # Every other segment reads fine, and so do the records before the damage.
        assert await read_each(b, "victim", range(first)) == victim[:first]
        assert await read_each(b, "victim", range(last + 1, 90)) == victim[last + 1:]
        assert await read_each(b, "victim", range(first, bad)) == victim[first:bad]
        if bad > first:
            batch = await b.read("victim", first)
            assert batch.payloads() == victim[first:bad]     # stops short of the damage

        # The broker, and the damaged session itself, keep serving.
        assert await read_all(b, "other") == other
        assert await b.append("other", b"more") == 30
        assert await b.append("victim", b"more") == 90
        assert (await b.read("victim", 89)).payloads() == [victim[89], b"more"]
        assert (await b.read("other", 30)).payloads() == [b"more"]
        with pytest.raises(broker.CorruptRecord):
            await b.read("victim", bad)


# ------------------------------------------------- (c) missing or bad .index

def _entries(data: bytes) -> list[tuple[int, int]]:
    return list(struct.iter_unpack("<II", data))


def _pack(entries: list[tuple[int, int]]) -> bytes:
    return b"".join(struct.pack("<II", rel, pos) for rel, pos in entries)


def damage_index(path: Path, how: str, seg_size: int) -> None:
    good = path.read_bytes()
    entries = _entries(good)
    assert len(entries) >= 3 and entries[0] == (0, 0) and entries[1][0] >= 2
    if how == "missing":
        path.unlink()
        return
    bad = {
        "garbage": os.urandom(37),
        "odd-length": good[:-3],
        "past-end": _pack(entries + [(entries[-1][0] + 1, seg_size + 100)]),
        "not-increasing": _pack(entries[::-1]),
        # Well formed, but pointing into the middle of records:
        "mid-record": _pack([(rel, pos + 5) for rel, pos in entries]),
        # Well formed, but from other contents: each entry names a record one
        # offset lower than the one that starts there.
        "stale": _pack(entries[:1] + [(rel - 1, pos) for rel, pos in entries[1:]]),
    }[how]
    path.write_bytes(bad)


@pytest.mark.parametrize("how", ["missing", "garbage", "odd-length", "past-end",
                                 "not-increasing", "mid-record", "stale"])
async def test_bad_index_is_rebuilt(tmp_path: Path, how: str) -> None:
    cfg = {**SMALL, "segment_bytes": 4096, "index_interval_bytes": 256}
    payloads = make_payloads(150)
    await populate(tmp_path, "s", payloads, **cfg)
    segs = segment_files(session_dir(tmp_path, "s"))
    assert len(segs) >= 4
    sealed = segs[:-1]
    indexes = [p.with_suffix(".index") for p in sealed]
    originals = [p.read_bytes() for p in indexes]
    for idx, seg in zip(indexes, sealed):
        damage_index(idx, how, seg.stat().st_size)

    async with broker.open_broker(tmp_path, **cfg) as b:
        assert await read_each(b, "s", range(150)) == payloads
        assert await read_all(b, "s") == payloads
        assert await b.append("s", b"next") == 150
    # The index is derived data: rebuilt, it is what the writer had made.
    assert [p.read_bytes() for p in indexes] == originals


@pytest.mark.parametrize("how", ["empty", "prefix"])
async def test_torn_index_write_still_reads_right(tmp_path: Path, how: str) -> None:
    # A crash while sealing can leave the index cut short (it is not fsynced).
    cfg = {**SMALL, "segment_bytes": 4096, "index_interval_bytes": 256}
    payloads = make_payloads(100)
    await populate(tmp_path, "s", payloads, **cfg)
    sealed = segment_files(session_dir(tmp_path, "s"))[:-1]
    for seg in sealed:
        idx = seg.with_suffix(".index")
        idx.write_bytes(b"" if how == "empty" else idx.read_bytes()[:16])
    async with broker.open_broker(tmp_path, **cfg) as b:
        assert await read_each(b, "s", range(100)) == payloads
        assert await read_all(b, "s") == payloads


# ---------------------------------------------------- (d) zero-length segments

def write_index(seg: Path, interval: int = 4096) -> None:
    """The index the broker writes when it seals ``seg``."""
    base = int(seg.name[:20])
    idx = _core.SparseIndex(base, interval)
    data = seg.read_bytes()
    assert _core.scan(data, 0, base, idx, 0)[0] == len(data)
    seg.with_suffix(".index").write_bytes(idx.to_bytes())


@pytest.mark.parametrize("sealed_index", [True, False])
async def test_empty_last_segment_after_roll(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, sealed_index: bool) -> None:
    payloads = make_payloads(40)
    await populate(tmp_path, "s", payloads, **SMALL)
    d = session_dir(tmp_path, "s")
    segs = segment_files(d)
    if sealed_index:
        write_index(segs[-1])
    # Killed right after rolling: the new segment exists, nothing in it yet.
    empty = d / f"{40:020d}.log"
    empty.touch()

    caplog.set_level(logging.WARNING, logger="broker.log")
    async with broker.open_broker(tmp_path, **SMALL) as b:
        info = await b.info("s")
        assert (info.start_offset, info.next_offset) == (0, 40)
        assert await read_each(b, "s", range(40)) == payloads
        assert await b.append("s", b"new") == 40
        assert await b.append_many("s", [b"a", b"b"]) == range(41, 43)
        assert await read_all(b, "s") == payloads + [b"new", b"a", b"b"]
    assert warnings_of(caplog) == []
    assert segment_files(d) == segs + [empty]
    assert [(o, p) for _, o, p in parse_segment(empty)] == [(40, b"new"), (41, b"a"),
                                                            (42, b"b")]
    async with broker.open_broker(tmp_path, **SMALL) as b:
        assert await read_all(b, "s") == payloads + [b"new", b"a", b"b"]


@pytest.mark.parametrize("tail", ["torn", "lost"])
async def test_empty_last_segment_after_roll_before_the_group_fsync(
        tmp_path: Path, tail: str) -> None:
    # With group commit, a roll can happen before the fsync that covers the
    # newest records of the segment being sealed: the actor writes them, the
    # next append rolls (creating the new, empty segment) and only then does
    # the group's fsync run.  None of those records was acknowledged yet, so a
    # power cut there may lose or tear them, while the new segment's directory
    # entry survives.  Reopening must not count, or serve, records that are
    # not whole: the log must end at the last whole record.
    payloads = make_payloads(40)
    await populate(tmp_path, "s", payloads, **SMALL)
    d = session_dir(tmp_path, "s")
    sealed = segment_files(d)[-1]
    records = parse_segment(sealed)
    pos, last, payload = records[-1]
    assert last == 39
    os.truncate(sealed, pos + (HEADER.size + len(payload) // 2 if tail == "torn" else 0))
    (d / f"{40:020d}.log").touch()

    async with broker.open_broker(tmp_path, **SMALL) as b:
        assert await read_each(b, "s", range(39)) == payloads[:39]
        info = await b.info("s")
        assert info.next_offset == 39, "the log counts a record that is not there"
        assert await read_all(b, "s") == payloads[:39]
        assert await b.append("s", b"new") == 39
        assert await read_all(b, "s") == payloads[:39] + [b"new"]


@pytest.mark.parametrize("at", ["after-base", "before-next"])
@pytest.mark.parametrize("empty_last", [False, True])
async def test_empty_segment_in_the_middle_is_dropped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, at: str, empty_last: bool) -> None:
    payloads = make_payloads(60)
    await populate(tmp_path, "s", payloads, **SMALL)
    d = session_dir(tmp_path, "s")
    segs = segment_files(d)
    assert len(segs) >= 3
    lo, hi = int(segs[0].name[:20]), int(segs[1].name[:20])
    assert hi - lo >= 3
    middle = d / f"{lo + 1 if at == 'after-base' else hi - 1:020d}.log"
    middle.touch()
    if empty_last:
        (d / f"{60:020d}.log").touch()

    caplog.set_level(logging.WARNING, logger="broker.log")
    async with broker.open_broker(tmp_path, **SMALL) as b:
        info = await b.info("s")
        assert (info.start_offset, info.next_offset) == (0, 60)
        assert await read_each(b, "s", range(60)) == payloads
        assert await read_all(b, "s") == payloads
        assert await b.append("s", b"new") == 60
    assert not middle.exists()
    msgs = warnings_of(caplog)
    assert len(msgs) == 1 and str(middle) in msgs[0] and "empty" in msgs[0], msgs
    async with broker.open_broker(tmp_path, **SMALL) as b:
        assert await read_all(b, "s") == payloads + [b"new"]


async def test_only_segment_truncated_to_zero_reopens_empty(tmp_path: Path) -> None:
    await populate(tmp_path, "s", make_payloads(10))
    (seg,) = segment_files(session_dir(tmp_path, "s"))
    os.truncate(seg, 0)
    async with broker.open_broker(tmp_path) as b:
        info = await b.info("s")
        assert (info.start_offset, info.next_offset) == (0, 0)
        batch = await b.read("s", broker.START)
        assert (len(batch), batch.next_offset) == (0, 0)
        with pytest.raises(broker.OffsetOutOfRange):
            await b.read("s", 1)
        assert await b.append("s", b"first again") == 0
        assert await b.append_many("s", [b"a", b"b"]) == range(1, 3)
    async with broker.open_broker(tmp_path) as b:
        assert await read_all(b, "s") == [b"first again", b"a", b"b"]
