"""Benchmark 1: the compiled Ring against a deque of tuples.

Workload: 100-byte payloads appended 100 at a time into a ring with the
broker's default byte budget (256 KiB, so about 2,600 records are held and
every append in steady state evicts), and reads of 100 records.

* subject: ``broker._core.Ring``: copies payloads into its arena; a read copies
  the wanted payloads into one new bytes object and returns a Batch.
* baseline: ``DequeRing``, a ``collections.deque(maxlen=...)`` of
  ``(offset, ts, payload)`` tuples with the same byte-budget eviction loop; it
  keeps references (no copy) and a read returns a list of tuples via
  ``itertools.islice`` with the same max_records/max_bytes limits.
* floor (reads only): a plain list slice ``records[i:i + 100]``, no budget, no
  limits: the least a Python reader could possibly do.
"""

from __future__ import annotations

import time
from collections import deque
from itertools import islice

import pytest

from broker import _core
from _benchlib import PAYLOAD_BYTES, make_payloads

CAPACITY = 256 * 1024      # BrokerConfig().ring_bytes
BATCH = 100                # records per extend / per read
MAX_BYTES = 1 << 20        # BrokerConfig().max_batch_bytes
MAX_RECORDS = 1024         # BrokerConfig().max_batch_records
WARM_BATCHES = 100         # 10,000 records: the ring is full and evicting


class DequeRing:
    """The simplest pure-Python ring: a bounded deque plus a byte budget."""

    def __init__(self, capacity_bytes: int, max_records: int = 0) -> None:
        self.capacity = capacity_bytes
        self.records: deque[tuple[int, int, bytes]] = deque(
            maxlen=max_records or max(16, capacity_bytes // 16))
        self.nbytes = 0
        self.start_offset = 0

    @property
    def next_offset(self) -> int:
        return self.start_offset + len(self.records)

    def extend(self, first_offset: int, ts: int, payloads: list[bytes]) -> None:
        if first_offset != self.next_offset:
            raise ValueError("gap")
        q = self.records
        maxlen = q.maxlen
        for i, p in enumerate(payloads):
            n = len(p)
            while q and (self.nbytes + n > self.capacity or len(q) == maxlen):
                self.nbytes -= len(q.popleft()[2])
                self.start_offset += 1
            q.append((first_offset + i, ts, p))
            self.nbytes += n

    def read(self, from_offset: int, upto_offset: int, max_records: int,
             max_bytes: int) -> list[tuple[int, int, bytes]] | None:
        i = from_offset - self.start_offset
        if i < 0:
            return None
        stop = min(i + max_records, upto_offset - self.start_offset, len(self.records))
        out: list[tuple[int, int, bytes]] = []
        total = 0
        for rec in islice(self.records, i, stop):
            n = len(rec[2])
            if out and total + n > max_bytes:
                break
            total += n
            out.append(rec)
        return out


def _filled(ring: _core.Ring | DequeRing, payloads: list[bytes]) -> int:
    ts = time.time_ns() // 1000
    off = 0
    for _ in range(WARM_BATCHES):
        ring.extend(off, ts, payloads)
        off += len(payloads)
    return off


def _info(benchmark, impl: str, role: str) -> None:
    benchmark.extra_info.update(impl=impl, role=role, records=BATCH,
                                bytes=BATCH * PAYLOAD_BYTES)


@pytest.mark.benchmark(group="ring-append")
@pytest.mark.parametrize("impl", ["Ring", "DequeRing"])
def test_ring_append(benchmark, impl: str) -> None:
    payloads = make_payloads(BATCH)
    ring = _core.Ring(CAPACITY) if impl == "Ring" else DequeRing(CAPACITY)
    state = [_filled(ring, payloads)]
    ts = time.time_ns() // 1000

    def append_batch() -> None:
        ring.extend(state[0], ts, payloads)
        state[0] += BATCH

    _info(benchmark, impl, "subject" if impl == "Ring" else "baseline")
    benchmark(append_batch)
    assert ring.next_offset == state[0]
    assert ring.nbytes <= CAPACITY


@pytest.mark.parametrize("where", ["tail", "oldest"])
@pytest.mark.parametrize("impl", ["Ring", "DequeRing", "list-slice"])
def test_ring_read(benchmark, impl: str, where: str) -> None:
    benchmark.group = f"ring-read-{where}"
    payloads = make_payloads(BATCH)
    if impl == "list-slice":
        dq = DequeRing(CAPACITY)
        end = _filled(dq, payloads)
        records = list(dq.records)
        start = dq.start_offset
        i = (end - BATCH - start) if where == "tail" else 0

        def read() -> object:
            return records[i:i + BATCH]
    else:
        ring = _core.Ring(CAPACITY) if impl == "Ring" else DequeRing(CAPACITY)
        end = _filled(ring, payloads)
        start = ring.start_offset
        frm = end - BATCH if where == "tail" else start

        def read() -> object:
            return ring.read(frm, frm + BATCH, MAX_RECORDS, MAX_BYTES)

    out = read()
    assert out is not None and len(out) == BATCH  # type: ignore[arg-type]
    role = {"Ring": "subject", "DequeRing": "baseline", "list-slice": "floor"}[impl]
    _info(benchmark, impl, role)
    benchmark.extra_info["held_records"] = end - start
    benchmark(read)
