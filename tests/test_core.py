"""The compiled core on its own: ring, framing, index. No I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import _core


def test_ring_holds_newest_within_budget() -> None:
    r = _core.Ring(100)
    r.extend(0, 7, [b"a" * 40, b"b" * 40])
    r.append(2, 8, b"c" * 40)          # does not fit beside both: evicts offset 0
    assert (r.start_offset, r.next_offset, len(r)) == (1, 3, 2)
    assert r.read(0) is None           # older than the ring: caller goes to disk
    batch = r.read(1)
    assert batch is not None
    assert batch.payloads() == [b"b" * 40, b"c" * 40]
    assert [(o, t) for o, t, _ in batch] == [(1, 7), (2, 8)]
    assert r.nbytes <= r.capacity


def test_ring_record_larger_than_budget_empties_it() -> None:
    r = _core.Ring(16)
    r.extend(0, 1, [b"x", b"y" * 17])
    assert (r.start_offset, r.next_offset, len(r)) == (2, 2, 0)
    r.append(2, 1, b"z")
    assert r.read(2).payloads() == [b"z"]  # type: ignore[union-attr]


def test_ring_rejects_gaps() -> None:
    r = _core.Ring(64)
    with pytest.raises(ValueError):
        r.append(5, 0, b"x")


def test_ring_read_limits_and_tail() -> None:
    r = _core.Ring(1 << 16)
    r.extend(0, 0, [bytes([i]) * 10 for i in range(10)])
    assert len(r.read(0, max_records=3)) == 3  # type: ignore[arg-type]
    assert len(r.read(0, max_bytes=25)) == 2  # type: ignore[arg-type]
    assert len(r.read(0, max_bytes=1)) == 1  # type: ignore[arg-type]  # at least one
    assert len(r.read(0, upto_offset=4)) == 4  # type: ignore[arg-type]
    tail = r.read(10)
    assert tail is not None and len(tail) == 0 and tail.next_offset == 10


@given(st.lists(st.binary(max_size=70), max_size=200), st.integers(20, 300))
def test_ring_matches_a_list(payloads: list[bytes], capacity: int) -> None:
    r = _core.Ring(capacity, max_records=17)
    for i, p in enumerate(payloads):
        r.append(i, i, p)
        assert r.nbytes <= capacity and len(r) <= 17
        got = r.read(r.start_offset)
        assert got is not None
        assert got.payloads() == payloads[r.start_offset:i + 1]
        assert i in range(r.start_offset, r.next_offset) or len(p) > capacity


def test_framing_round_trip_and_index() -> None:
    idx = _core.SparseIndex(100, interval=64)
    payloads = [bytes([i]) * (i * 7) for i in range(20)]
    data = _core.encode(100, 12345, payloads, 0, idx, 0)
    assert len(data) == sum(map(len, payloads)) + 28 * 20
    assert _core.scan(data, 0, 100) == (len(data), 120, _core.OK)
    for off in range(100, 120):
        batch, _, status = _core.decode(data, idx.lookup(off), off)
        assert status == _core.OK
        assert batch.first_offset == off
        assert batch.payloads() == payloads[off - 100:]
        assert batch.timestamp(0) == 12345


@pytest.mark.parametrize("cut", [1, 5, 23, 24, 30])
def test_scan_stops_at_a_torn_tail(cut: int) -> None:
    data = _core.encode(0, 0, [b"hello", b"world" * 3])
    end_first = 28 + 5
    assert _core.scan(data[:-cut], 0, 0) == (end_first, 1, _core.PARTIAL)


def test_scan_stops_at_a_flipped_bit() -> None:
    data = bytearray(_core.encode(0, 0, [b"a" * 10, b"b" * 10, b"c" * 10]))
    data[38 + 30] ^= 0x10        # inside the second record's payload
    assert _core.scan(bytes(data), 0, 0) == (38, 1, _core.BAD_CHECKSUM)


def test_scan_checks_offset_sequence() -> None:
    data = _core.encode(0, 0, [b"x"]) + _core.encode(5, 0, [b"y"])
    assert _core.scan(data, 0, 0) == (29, 1, _core.BAD_HEADER)


def test_index_file_round_trip_and_validation() -> None:
    idx = _core.SparseIndex(10, 1)
    for i in range(5):
        idx.note(10 + i, i * 100)
    data = idx.to_bytes()
    again = _core.SparseIndex.from_bytes(10, 1, data, 1000)
    assert again is not None and again.entries() == idx.entries()
    assert _core.SparseIndex.from_bytes(10, 1, data, 300) is None   # points past the file
    assert _core.SparseIndex.from_bytes(10, 1, data[:-3], 1000) is None
    assert again.lookup(9) == 0 and again.lookup(12) == 200 and again.lookup(99) == 400


def test_batch_views_share_one_buffer() -> None:
    b = _core.Batch.from_payloads(5, 1, [b"ab", b"", b"cde"])
    assert (b.first_offset, b.last_offset, b.next_offset, len(b), b.nbytes) == (5, 7, 8, 3, 5)
    assert b.join() == b"abcde"
    views = [p for _, _, p in b]
    assert all(v.obj is b.buffer for v in views)
    assert b.slice(1, 3).payloads() == [b"", b"cde"] and b.slice(1, 3).first_offset == 6
    assert not _core.Batch.empty(9) and _core.Batch.empty(9).next_offset == 9


def test_record_meta_travels_beside_the_payload() -> None:
    idx = _core.SparseIndex(0, 1)
    data = _core.encode(0, 5, [b"aa", b"bbb", b""], 0, idx, 0, {1: b"META", 2: b"M"})
    assert len(data) == 3 * 28 + 5 + 5
    assert _core.scan(data, 0, 0) == (len(data), 3, _core.OK)
    batch, _, status = _core.decode(data, 0, 0)
    assert status == _core.OK
    assert batch.payloads() == [b"aa", b"bbb", b""]          # readers see payloads only
    assert [batch.meta(i) for i in range(3)] == [None, b"META", b"M"]
    assert batch.metas() == [(1, b"META"), (2, b"M")]
    with pytest.raises(ValueError):
        _core.encode(0, 0, [b"x"], metas={1: b"no such record"})


def test_meta_length_past_the_record_is_a_bad_header() -> None:
    data = bytearray(_core.encode(0, 0, [b"abc"], metas={0: b"m"}))
    data[6] = 200                 # meta length now exceeds the record's length
    assert _core.scan(bytes(data), 0, 0) == (0, 0, _core.BAD_HEADER)


def test_ring_keeps_meta_and_flags_of_framed_records() -> None:
    data = _core.encode(3, 9, [b"a", b"bb", b"ccc"], {1: 1 << _core.KIND_SHIFT},
                        metas={0: b"M0", 2: b"M2"})
    r = _core.Ring(1 << 10)
    r.reset(3)
    r.extend_framed(data)
    b = r.read(3)
    assert b is not None
    assert b.payloads() == [b"a", b"bb", b"ccc"]
    assert [b.meta(i) for i in range(3)] == [b"M0", None, b"M2"]
    assert [b.flags(i) >> _core.KIND_SHIFT for i in range(3)] == [0, 1, 0]
    with pytest.raises(ValueError):
        r.extend_framed(data)             # offsets 3.. again: not the ring's next


def _unframe(frame: bytes) -> dict[str, object]:
    import msgpack
    n = frame[1] & 0x7F
    start = 2 if n < 126 else 4 if n == 126 else 10
    assert frame[0] == 0x82 and len(frame) - start == (
        n if n < 126 else int.from_bytes(frame[2:start], "big"))
    out: dict[str, object] = msgpack.unpackb(frame[start:])
    return out


@pytest.mark.parametrize("kinds,limit,want,next_offset", [
    (_core.ALL_KINDS, 100, [5, 6, 7], 8),
    (1 << 0, 100, [5, 7], 8),            # messages only
    (1 << 1, 100, [6], 8),               # signals only
    (_core.ALL_KINDS, 2, [5, 6], 7),     # credit cuts the batch
    (1 << 1, 1, [6], 8),                # a skipped record after the limit still moves the cursor
    (1 << 2, 100, [], 8),                # nothing matches: no frame, cursor moves on
])
def test_pack_data_builds_one_websocket_frame(kinds: int, limit: int, want: list[int],
                                              next_offset: int) -> None:
    import msgpack
    header = msgpack.packb(["alice", {"k": 1}])
    sizes = [1, 300, 70_000]           # bin8, bin16, bin32 and all three WS length forms
    data = _core.encode(5, 123, [b"x" * n for n in sizes], {1: 1 << _core.KIND_SHIFT},
                        metas={0: header})
    batch, _, _ = _core.decode(data, 0, 5)
    prefix = b"\x83" + b"".join(msgpack.packb(v) for v in ("t", "data", "s", "chat/1", "r"))
    frame, count, nxt = _core.pack_data(prefix, batch, kinds, limit)
    assert (count, nxt) == (len(want), next_offset)
    if not want:
        assert frame is None
        return
    assert frame is not None
    body = _unframe(frame)
    assert body["t"] == "data" and body["s"] == "chat/1"
    records = body["r"]
    assert isinstance(records, list)
    assert [r[0] for r in records] == want
    for off, ts, kind, head, payload in records:
        assert ts == 123 and kind == (1 if off == 6 else 0)
        assert head == (["alice", {"k": 1}] if off == 5 else None)
        assert payload == b"x" * sizes[off - 5]


@given(st.lists(st.tuples(st.binary(max_size=300), st.integers(0, 63)), min_size=1,
                max_size=40), st.integers(0, 2**40))
def test_pack_data_matches_msgpack(items: list[tuple[bytes, int]], first: int) -> None:
    import msgpack
    payloads = [p for p, _ in items]
    data = _core.encode(first, 2**45, payloads, {i: k << _core.KIND_SHIFT
                                                 for i, (_, k) in enumerate(items)})
    batch, _, _ = _core.decode(data, 0, first)
    frame, count, _ = _core.pack_data(b"\x81\xa1r", batch)
    assert frame is not None and count == len(items)
    assert _unframe(frame)["r"] == [[first + i, 2**45, k, None, p]
                                    for i, (p, k) in enumerate(items)]
