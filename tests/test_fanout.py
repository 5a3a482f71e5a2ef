"""Fan-out by cursor: one fast publisher, many readers, some slow.

Every reader must get every record exactly once and in order, and the
broker's memory must not grow with the backlog the slow readers leave behind:
they fall out of the ring and read from disk instead of being queued for.
"""

from __future__ import annotations

import gc
from pathlib import Path

import psutil
import pytest
import trio

import broker

RECORDS = 100_000
SIZE = 1000                      # 100 MB in all: a queued backlog would be obvious
READERS = 50
SLOW = 5


def payload(offset: int) -> bytes:
    return offset.to_bytes(8, "little") * (SIZE // 8)


@pytest.mark.slow
async def test_burst_to_fifty_readers_five_slow(tmp_path: Path) -> None:
    expected = b"".join(payload(i) for i in range(RECORDS))
    proc = psutil.Process()
    gc.collect()
    baseline = proc.memory_info().rss
    peak = baseline
    received = [0] * READERS
    disk_reads_needed = 0

    async with broker.open_broker(tmp_path, fsync=broker.FsyncPolicy("group")) as b:
        await b.create("s")
        ring_bytes = b.config.ring_bytes

        async def monitor() -> None:
            nonlocal peak
            while True:
                peak = max(peak, proc.memory_info().rss)
                await trio.sleep(0.01)

        async def reader(i: int, task_status: trio.TaskStatus[None]) -> None:
            nonlocal disk_reads_needed
            slow = i < SLOW
            async with b.subscribe("s", 0) as sub:
                task_status.started()
                expect = 0
                while expect < RECORDS:
                    batch = await sub.next(max_records=200 if slow else None)
                    assert batch.first_offset == expect          # no gap, no repeat
                    n = len(batch)
                    assert batch.join() == expected[expect * SIZE:(expect + n) * SIZE]
                    expect += n
                    if slow:
                        lag = (sub._actor.committed - expect) * SIZE  # type: ignore[union-attr]
                        if lag > ring_bytes:
                            disk_reads_needed += 1
                        await trio.sleep(0.002)                  # a reader on a bad link
                received[i] = expect

        async def publish() -> None:
            for start in range(0, RECORDS, 500):
                r = await b.append_many("s", [payload(o) for o in range(start, start + 500)])
                assert r == range(start, start + 500)

        async with trio.open_nursery() as outer:
            outer.start_soon(monitor)
            async with trio.open_nursery() as n:
                for i in range(READERS):
                    await n.start(reader, i)
                n.start_soon(publish)
            outer.cancel_scope.cancel()

    assert received == [RECORDS] * READERS
    assert disk_reads_needed > 0          # the slow readers really fell out of the ring
    growth = peak - baseline
    # Queuing the backlog for even one slow reader would cost 100 MB.
    print(f"RSS growth {growth / 2**20:.1f} MiB, slow reads behind the ring: {disk_reads_needed}")
    assert growth < 60 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"
