"""Benchmark 3: catch-up, reading a whole session back from disk.

One session of ``RECORDS`` records of 100 bytes is written once (untimed); a
timed round reads it from offset 0 to the end:

* subject ``SegmentLog.read``: ``read(off, end, 1024, 1 MiB)`` in a loop, the
  broker's default batch limits; each call looks the offset up in the sparse
  index, ``pread``s ``read_chunk_bytes`` (256 KiB) and decodes with the
  compiled ``decode`` (checks every returned record's CRC-32; the Batch points
  into the chunk, no per-record objects);
* subject ``SegmentLog.read+iter``: the same, also iterating every record of
  every batch (one ``(offset, ts, memoryview)`` per record), for comparison
  with the baseline, which makes one object per record;
* subject ``broker.read``: ``await Broker.read(name, off)`` in a loop on a
  broker whose ring (4 KiB) is far too small to hold the session, so every
  batch comes from disk (through the session actor's published state);
* baseline ``file.read+struct``: the same payloads in the simplest
  length-prefixed file (u32 length, payload; no checksum, no offsets), read in
  256 KiB chunks with ``struct.unpack_from`` per record and a bytes slice per
  payload.

The files were just written, so all of this reads from the page cache: it
measures the CPU cost of the read path, not the disk.
"""

from __future__ import annotations

import os
import struct
import tempfile
import time
from collections.abc import Iterator

import pytest

import broker
from broker._files import FileCache
from broker._log import SegmentLog
from _benchlib import PAYLOAD_BYTES, BrokerThread, make_payloads

RECORDS = 200_000
WRITE_BATCH = 1000
MAX_RECORDS = 1024           # BrokerConfig().max_batch_records
MAX_BYTES = 1 << 20          # BrokerConfig().max_batch_bytes
CHUNK = 256 * 1024           # BrokerConfig().read_chunk_bytes
ROUNDS = 7
SESSION = "catchup"
_LEN = struct.Struct("<I")


class Dataset:
    def __init__(self, root: str) -> None:
        self.root = root
        self.log_dir = os.path.join(root, "segments")
        self.plain_path = os.path.join(root, "plain.log")
        self.broker_dir = os.path.join(root, "broker")
        self.config = broker.BrokerConfig(fsync=broker.FsyncPolicy.parse("never"))
        self.log_bytes = 0


@pytest.fixture(scope="module")
def dataset() -> Iterator[Dataset]:
    with tempfile.TemporaryDirectory(prefix="broker-bench-catchup-") as root:
        ds = Dataset(root)
        payloads = make_payloads(WRITE_BATCH)
        ts = time.time_ns() // 1000
        # The segment log, directly.
        os.mkdir(ds.log_dir)
        files = FileCache(64)
        log = SegmentLog.open(ds.log_dir, files, ds.config)
        for _ in range(RECORDS // WRITE_BATCH):
            log.append(payloads, ts)
        log.sync_blocking()
        ds.log_bytes = sum(os.path.getsize(p) for p in log.paths)
        log.close()
        # The same payloads in the plain length-prefixed format.
        framed = b"".join(_LEN.pack(len(p)) + p for p in payloads)
        with open(ds.plain_path, "wb") as f:
            for _ in range(RECORDS // WRITE_BATCH):
                f.write(framed)
            f.flush()
            os.fsync(f.fileno())
        # A broker session holding the same records.
        with BrokerThread(ds.broker_dir, fsync=broker.FsyncPolicy.parse("never")) as bt:
            async def fill(b: broker.Broker) -> None:
                await b.create(SESSION)
                for _ in range(RECORDS // WRITE_BATCH):
                    await b.append_many(SESSION, payloads)
            bt.run(fill)
        yield ds


def _info(benchmark, impl: str, role: str, file_bytes: int) -> None:
    benchmark.extra_info.update(impl=impl, role=role, records=RECORDS,
                                bytes=RECORDS * PAYLOAD_BYTES, file_bytes=file_bytes)


@pytest.mark.benchmark(group="catchup-200k")
@pytest.mark.parametrize("impl", ["SegmentLog.read", "SegmentLog.read+iter"])
def test_catchup_segment_log(benchmark, dataset: Dataset, impl: str) -> None:
    log = SegmentLog.open(dataset.log_dir, FileCache(64), dataset.config)
    end = log.next_offset
    assert end == RECORDS
    iterate = impl.endswith("+iter")

    def read_all() -> int:
        off = n = 0
        while off < end:
            batch = log.read(off, end, MAX_RECORDS, MAX_BYTES)
            if iterate:
                for _rec in batch:
                    n += 1
            else:
                n += len(batch)
            off = batch.next_offset
        return n

    assert read_all() == RECORDS
    _info(benchmark, impl, "subject", dataset.log_bytes)
    try:
        benchmark.pedantic(read_all, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    finally:
        log.close()


@pytest.mark.benchmark(group="catchup-200k")
def test_catchup_broker_read(benchmark, dataset: Dataset) -> None:
    async def read_all(b: broker.Broker) -> int:
        off = n = 0
        info = await b.info(SESSION)
        end = info.next_offset
        while off < end:
            batch = await b.read(SESSION, off)
            n += len(batch)
            off = batch.next_offset
        return n

    with BrokerThread(dataset.broker_dir, ring_bytes=4096) as bt:
        assert bt.run(read_all) == RECORDS
        _info(benchmark, "broker.read", "subject", dataset.log_bytes)
        benchmark.pedantic(bt.run, args=(read_all,), rounds=ROUNDS, warmup_rounds=1,
                           iterations=1)


@pytest.mark.benchmark(group="catchup-200k")
def test_catchup_plain_file(benchmark, dataset: Dataset) -> None:
    unpack_from = _LEN.unpack_from

    def read_all() -> int:
        n = 0
        rest = b""
        with open(dataset.plain_path, "rb", buffering=0) as f:
            while True:
                chunk = f.read(CHUNK)
                if not chunk:
                    break
                buf = rest + chunk if rest else chunk
                pos, size = 0, len(buf)
                payloads = []
                while pos + 4 <= size:
                    (ln,) = unpack_from(buf, pos)
                    if pos + 4 + ln > size:
                        break
                    payloads.append(buf[pos + 4:pos + 4 + ln])
                    pos += 4 + ln
                n += len(payloads)
                rest = buf[pos:]
        return n

    assert read_all() == RECORDS
    _info(benchmark, "file.read+struct", "baseline", os.path.getsize(dataset.plain_path))
    benchmark.pedantic(read_all, rounds=ROUNDS, warmup_rounds=1, iterations=1)
