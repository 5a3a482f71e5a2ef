"""Benchmark 2: appending durably, per fsync policy.

Part A, the segment log alone (blocking, no Trio).  A timed round is
``APPENDS`` appends of ``BATCH`` 100-byte records into a fresh directory:

* subject: ``SegmentLog.append(payloads, ts)`` (frames with the compiled
  ``encode``: header, CRC-32, sparse index; one ``pwrite``), then
  ``sync_blocking()`` per the policy;
* baseline: ``f.write(data)`` on an unbuffered file (one ``write`` system call)
  of the same bytes (one ``encode`` output, built once before timing), then
  ``os.fsync`` per the same policy.  This is the I/O floor: no framing, no
  checksum, no index.  Like ``SegmentLog.open``, the setup (untimed) creates the
  file and fsyncs it and its directory, so the first timed fsync pays for the
  data only.

Policies: ``always`` syncs after every append call, ``group`` after every
``GROUP_APPENDS`` appends (1,000 records, the default group size), ``never``
not at all.

Part B, the whole broker: ``P`` concurrent Trio publishers, each awaiting
``append_many`` of ``BROKER_BATCH`` records (a closed loop: each publisher has
one append in flight).  Acknowledged appends per second, for each policy and
publisher count; fsync rounds are counted.  The baseline is the naive Trio
equivalent in the same loop: each publisher ``os.write``s the same number of
bytes and, for ``always`` and ``group`` (both acknowledge only durable
records), awaits its own ``os.fsync`` in a worker thread; for ``never`` it only
writes.  The broker's ``group`` policy waits up to ``interval_ms`` (2 ms) for
more records unless ``max_records`` (1,000) are already waiting.
"""

from __future__ import annotations

import os
import time

import pytest
import trio

import broker
from broker import _core
from broker._files import FileCache, fsync_dir
from broker._log import SegmentLog
from _benchlib import PAYLOAD_BYTES, BrokerThread, make_payloads

POLICIES = ["always", "group", "never"]

# Part A
BATCH = 100
APPENDS = 40
GROUP_APPENDS = 10          # 10 x 100 = 1,000 records, FsyncPolicy().max_records
ROUNDS_A = 50

# Part B
BROKER_BATCH = 10
PUBLISHERS = [1, 16, 128]
APPENDS_PER_PUBLISHER = {1: 300, 16: 60, 128: 12}
ROUNDS_B = 5


def _syncs_after(policy: str, i: int) -> bool:
    return policy == "always" or (policy == "group" and (i + 1) % GROUP_APPENDS == 0)


# ------------------------------------------------------------------ part A


@pytest.mark.parametrize("impl", ["SegmentLog", "file.write"])
@pytest.mark.parametrize("policy", POLICIES)
def test_segment_append(benchmark, bench_dir: str, policy: str, impl: str) -> None:
    benchmark.group = f"segment-append-{policy}"
    payloads = make_payloads(BATCH)
    ts = time.time_ns() // 1000
    frame = _core.encode(0, ts, payloads)       # the bytes one append writes
    config = broker.BrokerConfig(fsync=broker.FsyncPolicy.parse(policy))
    files = FileCache(64)
    opened: list[SegmentLog] = []
    fileobjs: list = []
    n = [0]

    def fresh_dir() -> str:
        n[0] += 1
        d = os.path.join(bench_dir, f"r{n[0]}")
        os.mkdir(d)
        return d

    if impl == "SegmentLog":
        def setup() -> tuple[tuple[object, ...], dict[str, object]]:
            for old in opened:
                old.close()
            log = SegmentLog.open(fresh_dir(), files, config)
            opened.append(log)
            return (log,), {}

        def run(log: SegmentLog) -> None:
            for i in range(APPENDS):
                log.append(payloads, ts)
                if _syncs_after(policy, i):
                    log.sync_blocking()
    else:
        def setup() -> tuple[tuple[object, ...], dict[str, object]]:
            for old in fileobjs:
                old.close()
            d = fresh_dir()
            f = open(os.path.join(d, "plain.log"), "ab", buffering=0)
            # As SegmentLog.open does for a new segment: make the empty file and
            # its directory entry durable before the timed appends.
            os.fsync(f.fileno())
            fsync_dir(d)
            fileobjs.append(f)
            return (f,), {}

        def run(f) -> None:  # type: ignore[no-untyped-def]
            fd = f.fileno()
            for i in range(APPENDS):
                f.write(frame)
                if _syncs_after(policy, i):
                    os.fsync(fd)

    benchmark.extra_info.update(
        impl=impl, role="subject" if impl == "SegmentLog" else "baseline",
        records=APPENDS * BATCH, appends=APPENDS, bytes=APPENDS * BATCH * PAYLOAD_BYTES,
        file_bytes=APPENDS * len(frame),
        fsyncs=sum(_syncs_after(policy, i) for i in range(APPENDS)))
    try:
        benchmark.pedantic(run, setup=setup, rounds=ROUNDS_A, warmup_rounds=1, iterations=1)
    finally:
        for log in opened:
            assert log.next_offset == APPENDS * BATCH
            log.close()
        for f in fileobjs:
            f.close()


# ------------------------------------------------------------------ part B


async def _broker_round(b: broker.Broker, name: str, publishers: int, per: int,
                        payloads: list[bytes]) -> None:
    async def publisher() -> None:
        for _ in range(per):
            await b.append_many(name, payloads)

    async with trio.open_nursery() as nursery:
        for _ in range(publishers):
            nursery.start_soon(publisher)


async def _naive_round(b: broker.Broker, fd: int, publishers: int, per: int, data: bytes,
                       sync: bool, fsyncs: list[int]) -> None:
    async def publisher() -> None:
        for _ in range(per):
            os.write(fd, data)
            if sync:
                await trio.to_thread.run_sync(os.fsync, fd)
                fsyncs[0] += 1

    async with trio.open_nursery() as nursery:
        for _ in range(publishers):
            nursery.start_soon(publisher)


@pytest.mark.parametrize("impl", ["broker", "naive"])
@pytest.mark.parametrize("publishers", PUBLISHERS)
@pytest.mark.parametrize("policy", POLICIES)
def test_broker_append(benchmark, bench_dir: str, fsync_counter: list[int], policy: str,
                       publishers: int, impl: str) -> None:
    benchmark.group = f"broker-append-{policy}-p{publishers}"
    per = APPENDS_PER_PUBLISHER[publishers]
    appends = publishers * per
    payloads = make_payloads(BROKER_BATCH)
    data = _core.encode(0, time.time_ns() // 1000, payloads)
    fsync = broker.FsyncPolicy.parse(policy)
    naive_fsyncs = [0]
    rounds = [0]
    per_round_fsyncs: list[int] = []   # fsync rounds in each round, warm-up included
    fds: list[int] = []

    with BrokerThread(os.path.join(bench_dir, "data"), fsync=fsync) as bt:
        if impl == "broker":
            def setup() -> tuple[tuple[object, ...], dict[str, object]]:
                if rounds[0]:
                    per_round_fsyncs.append(fsync_counter[0])
                rounds[0] += 1
                name = f"s{rounds[0]}"
                bt.run(lambda b: b.create(name))
                fsync_counter[0] = 0
                return (name,), {}

            def run(name: str) -> None:
                bt.run(_broker_round, name, publishers, per, payloads)
        else:
            def setup() -> tuple[tuple[object, ...], dict[str, object]]:
                if rounds[0]:
                    per_round_fsyncs.append(naive_fsyncs[0])
                rounds[0] += 1
                for fd in fds:
                    os.close(fd)
                fds.clear()
                fd = os.open(os.path.join(bench_dir, f"naive{rounds[0]}.log"),
                             os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
                fds.append(fd)
                naive_fsyncs[0] = 0
                return (fd,), {}

            def run(fd: int) -> None:
                bt.run(_naive_round, fd, publishers, per, data, policy != "never",
                       naive_fsyncs)

        try:
            benchmark.pedantic(run, setup=setup, rounds=ROUNDS_B, warmup_rounds=1,
                               iterations=1)
        finally:
            for fd in fds:
                os.close(fd)
        if impl == "broker":
            # Everything was acknowledged, so it must all be there.
            info = bt.run(lambda b: b.info(f"s{rounds[0]}"))
            assert info.next_offset == appends * BROKER_BATCH
        per_round_fsyncs.append(fsync_counter[0] if impl == "broker" else naive_fsyncs[0])
        timed = sorted(per_round_fsyncs[1:])    # drop the warm-up round

    benchmark.extra_info.update(
        impl=impl, role="subject" if impl == "broker" else "baseline",
        publishers=publishers, records=appends * BROKER_BATCH, appends=appends,
        bytes=appends * BROKER_BATCH * PAYLOAD_BYTES, fsyncs=timed[len(timed) // 2],
        fsyncs_min=timed[0], fsyncs_max=timed[-1])
