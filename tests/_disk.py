"""Test helpers: an independent reader of the on-disk format, and a full read.

parse_segment re-implements the record framing from docs/architecture.md in
plain Python (struct + zlib), so the tests check the bytes on disk against the
documented format rather than against the code that wrote them.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import broker

HEADER = struct.Struct("<IHHqq")      # length, flags, meta length, offset, timestamp


def segment_files(session_dir: Path) -> list[Path]:
    return sorted(session_dir.glob("*.log"))


def parse_segment(path: Path) -> list[tuple[int, int, bytes]]:
    """(file position, offset, payload) of each record; the file must be whole."""
    data = path.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        length, _flags, meta_len, offset, _ts = HEADER.unpack_from(data, pos)
        end = pos + HEADER.size + length
        (crc,) = struct.unpack_from("<I", data, end)
        assert meta_len <= length and crc == zlib.crc32(data[pos:end]), (path, pos)
        out.append((pos, offset, data[pos + HEADER.size + meta_len:end]))
        pos = end + 4
    assert pos == len(data), path
    return out


async def read_all(b: broker.Broker, name: str, batch_records: int = 64) -> list[bytes]:
    """Every record from START to the end, checking offsets run on from 0."""
    info = await b.info(name)
    assert info.start_offset == 0
    got: list[bytes] = []
    while len(got) < info.next_offset:
        batch = await b.read(name, len(got), max_records=batch_records)
        assert batch.first_offset == len(got) and len(batch) > 0
        assert [o for o, _, _ in batch] == list(range(len(got), len(got) + len(batch)))
        got.extend(batch.payloads())
        assert batch.next_offset == len(got)
    assert not await b.read(name, len(got))      # nothing past next_offset
    return got
