"""Property tests: random operation sequences checked against a list model.

Each example draws a small broker configuration (tiny segments, rings and read
chunks, so records span segment rolls and ring eviction and reads alternate
between the ring and the disk) and a list of operations on 2-3 sessions:
appends (single and batches, payloads of 0..3000 bytes), reads from random
offsets with random limits, full drains, reopening the broker on the same
directory, and delete / recreate.  After every operation each session's info()
is checked against the model.

The operations run inside one ``trio.run`` per example, on a fresh temporary
directory, from a plain synchronous test: Hypothesis drives the examples.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import broker

OVERHEAD = broker._core.RECORD_OVERHEAD
NAMES = ("alpha", "beta", "gamma")


# --------------------------------------------------------------------- model


def make_payload(name: str, epoch: int, offset: int, size: int) -> bytes:
    """A payload that says where it belongs (truncated for short sizes)."""
    tag = f"<{name}/{epoch}/{offset}>".encode()
    return (tag * (size // len(tag) + 1))[:size]


@dataclass
class SessionModel:
    exists: bool = False
    epoch: int = 0
    records: list[bytes] = field(default_factory=list)
    start: int = 0          # last start_offset seen (retention moves it forward only)


@dataclass
class Model:
    names: tuple[str, ...]
    retention: int | None
    sessions: dict[str, SessionModel] = field(default_factory=dict)
    max_epoch: int = 0      # epochs come from one broker-wide counter

    def __post_init__(self) -> None:
        self.sessions = {n: SessionModel() for n in self.names}


# ------------------------------------------------------------------- checks


def check_batch(batch: broker.Batch, records: list[bytes], offset: int,
                max_records: int | None, max_bytes: int | None) -> None:
    """``batch`` read at ``offset`` is a non-empty prefix of records[offset:] in limits."""
    got = batch.payloads()
    assert batch.first_offset == offset
    assert len(batch) == len(got)
    assert batch.next_offset == offset + len(got)
    if offset < len(records):
        assert got, f"empty batch at {offset} with {len(records)} records"
    else:
        assert not got
    assert got == records[offset:offset + len(got)], f"wrong records from offset {offset}"
    for i in range(len(got)):
        assert batch.offset(i) == offset + i
        assert batch.flags(i) == 0
    if max_records is not None:
        assert len(got) <= max_records
    if max_bytes is not None and len(got) > 1:
        assert sum(map(len, got)) <= max_bytes


async def check_info(b: broker.Broker, model: Model, name: str) -> None:
    s = model.sessions[name]
    if not s.exists:
        with pytest.raises(broker.SessionNotFound):
            await b.info(name)
        return
    info = await b.info(name)
    assert info.name == name
    assert info.epoch == s.epoch
    assert info.next_offset == len(s.records)
    assert not info.closed
    if model.retention is None:
        assert info.start_offset == 0
    else:
        # Retention drops whole old segments: start only moves forward, never
        # past the end, and what is kept is still at least retention_bytes.
        assert s.start <= info.start_offset <= info.next_offset
        if info.start_offset > 0:
            kept = sum(len(p) + OVERHEAD for p in s.records[info.start_offset:])
            assert kept >= model.retention
    s.start = info.start_offset


async def drain(b: broker.Broker, model: Model, name: str, max_records: int | None,
                max_bytes: int | None) -> None:
    """Read the whole session from START in batches; it must equal the model."""
    s = model.sessions[name]
    if not s.exists:
        with pytest.raises(broker.SessionNotFound):
            await b.read(name, broker.START)
        return
    start = (await b.info(name)).start_offset
    first = await b.read(name, broker.START, max_records=max_records, max_bytes=max_bytes)
    check_batch(first, s.records, start, max_records, max_bytes)
    batch, offset = first, first.next_offset
    while batch:
        batch = await b.read(name, offset, max_records=max_records, max_bytes=max_bytes)
        check_batch(batch, s.records, offset, max_records, max_bytes)
        offset = batch.next_offset
    assert offset == len(s.records)


# --------------------------------------------------------------- operations


async def do_create(b: broker.Broker, model: Model, name: str) -> None:
    s = model.sessions[name]
    info, created = await b.create(name)
    assert created == (not s.exists)
    if created:
        assert info.epoch > model.max_epoch, "a new session reused an epoch"
        assert info.next_offset == 0 and info.start_offset == 0
        s.exists, s.epoch, s.records, s.start = True, info.epoch, [], 0
        model.max_epoch = info.epoch
    else:
        assert info.epoch == s.epoch
        assert info.next_offset == len(s.records)


async def apply(b: broker.Broker, model: Model, op: tuple[Any, ...]) -> None:
    kind, name = op[0], op[1]
    s = model.sessions[name]
    if kind == "append":
        size = op[2]
        if not s.exists:
            with pytest.raises(broker.SessionNotFound):
                await b.append(name, b"x" * size)
            return
        payload = make_payload(name, s.epoch, len(s.records), size)
        offset = await b.append(name, payload)
        assert offset == len(s.records)
        s.records.append(payload)
    elif kind == "append_many":
        sizes = op[2]
        if not s.exists:
            with pytest.raises(broker.SessionNotFound):
                await b.append_many(name, [b"x" * n for n in sizes])
            return
        n0 = len(s.records)
        payloads = [make_payload(name, s.epoch, n0 + i, n) for i, n in enumerate(sizes)]
        offsets = await b.append_many(name, payloads)
        assert offsets == range(n0, n0 + len(payloads))
        s.records.extend(payloads)
    elif kind == "read":
        await do_read(b, model, name, *op[2:])
    elif kind == "drain":
        await drain(b, model, name, op[2], op[3])
    elif kind == "delete":
        if not s.exists:
            with pytest.raises(broker.SessionNotFound):
                await b.delete(name)
            return
        await b.delete(name)
        s.exists, s.records, s.start = False, [], 0
        with pytest.raises(broker.SessionNotFound):
            await b.info(name)
        with pytest.raises(broker.SessionNotFound):
            await b.read(name, 0)
        with pytest.raises(broker.SessionNotFound):
            await b.append(name, b"late")
        if op[2]:
            old_epoch = s.epoch
            await do_create(b, model, name)
            assert s.epoch > old_epoch
            batch = await b.read(name, broker.START)
            assert not batch and batch.first_offset == 0
    elif kind == "create":
        await do_create(b, model, name)
    else:  # pragma: no cover
        raise AssertionError(op)


async def do_read(b: broker.Broker, model: Model, name: str, where: tuple[Any, ...],
                  max_records: int | None, max_bytes: int | None) -> None:
    s = model.sessions[name]
    if not s.exists:
        with pytest.raises(broker.SessionNotFound):
            await b.read(name, 0, max_records=max_records, max_bytes=max_bytes)
        return
    info = await b.info(name)
    start, end = info.start_offset, info.next_offset

    async def read(offset: int) -> broker.Batch:
        return await b.read(name, offset, max_records=max_records, max_bytes=max_bytes)

    kind = where[0]
    if kind == "start":
        check_batch(await read(broker.START), s.records, start, max_records, max_bytes)
    elif kind == "now":
        check_batch(await read(broker.NOW), s.records, end, max_records, max_bytes)
    elif kind == "at":
        offset = start + where[1] % (end - start + 1)
        check_batch(await read(offset), s.records, offset, max_records, max_bytes)
    elif kind == "past":
        offset = end + where[1]
        with pytest.raises(broker.OffsetOutOfRange):
            await read(offset)
    elif kind == "negative":
        with pytest.raises(broker.OffsetOutOfRange):
            await read(-3 - where[1])
    elif kind == "old":
        if start == 0:
            check_batch(await read(0), s.records, 0, max_records, max_bytes)
            return
        offset = where[1] % start
        with pytest.raises(broker.OffsetTooOld) as exc_info:
            await read(offset)
        assert exc_info.value.earliest == start
        assert exc_info.value.offset == offset
        # Everything from start on is still the model's tail.
        check_batch(await read(start), s.records, start, max_records, max_bytes)
    else:  # pragma: no cover
        raise AssertionError(where)


async def run_ops(path: str, config: dict[str, Any], names: tuple[str, ...],
                  ops: list[tuple[Any, ...]]) -> None:
    model = Model(names, config.get("retention_bytes"))
    # Each "reopen" ends one broker lifetime and starts the next.
    lifetimes: list[list[tuple[Any, ...]]] = [[]]
    for op in ops:
        if op[0] == "reopen":
            lifetimes.append([])
        else:
            lifetimes[-1].append(op)
    for n, lifetime in enumerate(lifetimes):
        async with broker.open_broker(path, **config) as b:
            if n == 0:
                for name in names:
                    await do_create(b, model, name)
            else:
                # Right after a reopen the rings are empty: this reads from disk.
                for name in names:
                    await check_info(b, model, name)
                    await drain(b, model, name, None, None)
            for op in lifetime:
                await apply(b, model, op)
                for name in names:
                    await check_info(b, model, name)
            for name in names:
                await drain(b, model, name, None, None)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def run_example(config: dict[str, Any], names: tuple[str, ...],
                ops: list[tuple[Any, ...]]) -> None:
    tmp = tempfile.mkdtemp(prefix="broker-prop-")
    try:
        trio.run(run_ops, os.path.join(tmp, "data"), config, names, ops)
    except BaseExceptionGroup as group:
        # Failures surface through the broker's nursery: report the one inside.
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------- strategies

sizes = st.one_of(st.integers(0, 48), st.integers(300, 3000), st.sampled_from([0, 1000, 3000]))
limits = st.one_of(st.none(), st.integers(1, 8), st.integers(1, 200))
byte_limits = st.one_of(st.none(), st.integers(1, 64), st.integers(1, 12_000))
fsync = st.sampled_from(["never"] * 6 + ["group:0.5ms", "always"]).map(broker.FsyncPolicy.parse)


def configs(retention: bool) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({
        "segment_bytes": st.integers(1024, 4096),
        "ring_bytes": st.integers(512, 4096),
        "index_interval_bytes": st.sampled_from([64, 256, 1024, 4096]),
        "read_chunk_bytes": st.sampled_from([64, 512, 2048, 1 << 18]),
        "fsync": fsync,
        **({"retention_bytes": st.integers(512, 6144)} if retention else {}),
    })


def ops_for(names: tuple[str, ...], retention: bool) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    name = st.sampled_from(names)
    wheres = [st.tuples(st.just("start")), st.tuples(st.just("now")),
              st.tuples(st.just("at"), st.integers(0, 1 << 16)),
              st.tuples(st.just("past"), st.integers(1, 3)),
              st.tuples(st.just("negative"), st.integers(0, 3))]
    if retention:
        wheres += [st.tuples(st.just("old"), st.integers(0, 1 << 16))] * 2
    op = st.one_of(
        st.tuples(st.just("append"), name, sizes),
        st.tuples(st.just("append"), name, sizes),
        st.tuples(st.just("append"), name, sizes),
        st.tuples(st.just("append_many"), name, st.lists(sizes, max_size=12)),
        st.tuples(st.just("append_many"), name, st.lists(sizes, max_size=12)),
        st.tuples(st.just("read"), name, st.one_of(*wheres), limits, byte_limits),
        st.tuples(st.just("read"), name, st.one_of(*wheres), limits, byte_limits),
        st.tuples(st.just("drain"), name, limits, byte_limits),
        st.tuples(st.just("reopen")),
        st.tuples(st.just("delete"), name, st.booleans()),
        st.tuples(st.just("create"), name),
    )
    return st.lists(op, min_size=20, max_size=60)


@st.composite
def scenarios(draw: st.DrawFn, retention: bool) -> tuple[dict[str, Any], tuple[str, ...],
                                                          list[tuple[Any, ...]]]:
    names = NAMES[:draw(st.integers(2, 3))]
    return draw(configs(retention)), names, draw(ops_for(names, retention))


PROPERTY_SETTINGS = settings(max_examples=100, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow,
                                                    HealthCheck.data_too_large])


# -------------------------------------------------------------------- tests


@PROPERTY_SETTINGS
@given(scenarios(retention=False))
def test_operations_match_list_model(scenario: tuple[dict[str, Any], tuple[str, ...],
                                                     list[tuple[Any, ...]]]) -> None:
    run_example(*scenario)


@PROPERTY_SETTINGS
@given(scenarios(retention=True))
def test_retention_keeps_model_tail(scenario: tuple[dict[str, Any], tuple[str, ...],
                                                    list[tuple[Any, ...]]]) -> None:
    run_example(*scenario)


# A command whose handler fails with an unexpected error must still be
# answered: found while checking that these properties can fail.  Extras that
# JSON cannot encode make the actor crash with TypeError (only BrokerError,
# OSError and ValueError are turned into replies), and the caller then waits
# forever on a reply nobody sets.


@pytest.mark.parametrize("command", ["create", "set_extra"])
async def test_unencodable_extra_is_an_error_not_a_hang(tmp_path: Path, command: str) -> None:
    async with broker.open_broker(tmp_path / "data",
                                  fsync=broker.FsyncPolicy.parse("never")) as b:
        await b.create("s")
        with trio.fail_after(2):
            with pytest.raises((TypeError, ValueError, broker.BrokerError)):
                if command == "create":
                    await b.create("t", extra={"tags": {1, 2}})
                else:
                    await b.set_extra("s", {"tags": {1, 2}})
            # The session is still usable afterwards.
            assert await b.append("s", b"ok") == 0
            assert (await b.info("s")).extra == {}
